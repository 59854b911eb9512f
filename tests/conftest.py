"""Shared test setup. Fixtures of each area live in tests/plugins/<area>.py."""

from __future__ import annotations

pytest_plugins = [
    "tests.plugins.require",
    "tests.plugins.home",
    "tests.plugins.sshd",
    "tests.plugins.golden",
    "tests.plugins.vms",
    "tests.plugins.agentrepo",
    "tests.plugins.jobimages",
    "tests.plugins.boundarynet",
    "tests.plugins.tier1gw",
    "tests.plugins.vmgw",
]
