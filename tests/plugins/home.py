"""An isolated avm home per test, and the CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.home import Home


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A fresh, empty avm home; AVM_HOME points at it for CLI calls in the same process."""
    h = Home(tmp_path / "avm-home").ensure()
    monkeypatch.setenv("AVM_HOME", str(h.root))
    return h
