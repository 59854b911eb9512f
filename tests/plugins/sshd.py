"""Fixtures for a real OpenSSH server on 127.0.0.1 (filled in with the SSH transport)."""
