"""Prerequisites that `make setup` installs: a missing one fails the test, it never skips it.

A test that skips on a fresh machine proves nothing, so these fail loudly with what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def require(ok: bool, what: str) -> None:
    if not ok:
        pytest.fail(f"prerequisite missing: {what}; `make setup` (as root) provides it", pytrace=False)


def require_root(why: str) -> None:
    require(os.geteuid() == 0, f"root ({why})")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not os.path.exists(t)]
    require(not missing, f"tools {missing}")


def require_modules(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    require(not missing, f"Python modules {missing} (the `make test` extras)")


@pytest.fixture
def gcp_extra() -> None:
    require_modules("pulumi", "pulumi_gcp")


@pytest.fixture
def libvirt_extra() -> None:
    require_modules("libvirt")


@pytest.fixture
def root_net_tools() -> None:
    require_root("job networks")
    require_tools("ip", "nft")
