"""Shared test setup. Fixtures of each area live in tests/plugins/<area>.py."""

from __future__ import annotations

import pytest

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

# The longest modules (measured: `make test` prints the slowest with --durations), started
# first: pytest-xdist hands out whole files in collection order, so a long file collected last
# would run alone at the end while the other worker idles.
LONGEST_FIRST = (
    "test_gateway_qemu.py",
    "test_gateway_libvirt.py",
    "test_vm_warm_qemu.py",
    "test_status_qemu.py",
    "test_enforcement_qemu.py",
    "test_image_repro.py",
    "test_jobs_leftovers.py",
    "test_promote_nspawn.py",
    "test_status_nspawn.py",
    "test_jobs_output.py",
    "test_requests_nspawn.py",
    "test_classifier_nspawn.py",
    "test_gateway_nspawn.py",
    "test_jobs_hostile.py",
    "test_mcp_nspawn.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the longest modules first (stable: every module's tests stay together, in order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
