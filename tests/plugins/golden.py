"""Fixtures for the golden image (filled in with the image build)."""
