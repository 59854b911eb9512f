"""The golden host's state after a real promotion, asserted with testinfra over avm's SSH transport.

A real nspawn golden VM (systemd, sshd), the example agent promoted with `avm promote --apply`,
then testinfra (through tests/hostinfra.py: avm's pinned-key transport, never testinfra's own
paramiko backend) checks units running as their users, release files with their modes and
hashes, sockets listening and users present. Note: nspawn VMs share the host network for now,
so the agent ports 18081-18083 collide with another run that promotes the example agent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from controlplane.errors import AvmError
from controlplane.home import Home
from controlplane.release import bundle
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests import hostinfra
from tests.plugins.agentrepo import AgentRepo
from tests.plugins.vms import run_avm

PROFILES = {"canary": 18081, "web": 18082, "batch": 18083}


@pytest.fixture(scope="module")
def promoted(golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str) -> str:
    v1 = agent_repo.commits["v1"]
    out = run_avm(
        golden_home, "--json", "promote", "--repo", str(agent_repo.path), "--commit", v1,
        "--target", nspawn_vm, "--apply",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(json.loads(out.stdout)["healthy"]) == sorted(PROFILES)
    return v1


@pytest.fixture
def host(golden_home: Home, nspawn_vm: str) -> Iterator[Any]:
    with SshTransport.from_target(inventory.load(golden_home, nspawn_vm)) as ssh:
        yield hostinfra.host(ssh)


def test_agent_users_exist_without_a_login(host: Any, promoted: str) -> None:
    for profile in PROFILES:
        user = host.user(f"agent-{profile}")
        assert user.exists
        assert user.shell == "/usr/sbin/nologin"
        assert user.home == "/nonexistent"
        assert user.group == f"agent-{profile}"
    assert host.user("root").uid == 0
    assert not host.user("agent-absent").exists


def test_each_agent_unit_runs_as_its_own_user(host: Any, promoted: str) -> None:
    for profile in PROFILES:
        unit = f"agent-gateway@{profile}.service"
        assert host.service(unit).is_running
        pid = int(host.check_output(f"systemctl show -p MainPID --value {unit}"))
        assert pid > 0
        owner = host.check_output(f"stat -c %U /proc/{pid}")
        assert owner == f"agent-{profile}"
    assert host.service("ssh").is_running


def test_release_files_have_their_signed_hashes_and_read_only_modes(
    host: Any, promoted: str, agent_repo: AgentRepo
) -> None:
    built = bundle.build(agent_repo.path, promoted)
    root = f"/opt/agent/releases/{promoted}"
    assert host.file(root).is_directory and host.file(root).mode == 0o555
    assert host.file(root).user == "root" and host.file(root).group == "root"
    for path, digest in built.files.items():
        entry = host.file(f"{root}/{path}")
        assert entry.is_file, path
        assert entry.sha256sum == digest.removeprefix("sha256:"), path
        assert entry.mode == (0o555 if path in built.executables else 0o444), path
        assert (entry.user, entry.group) == ("root", "root"), path
    for profile in PROFILES:
        current = host.file(f"/opt/agent/profiles/{profile}/current")
        assert current.is_symlink and current.linked_to == root


def test_each_agent_listens_on_its_port_and_sshd_on_its_own(
    host: Any, promoted: str, golden_home: Home, nspawn_vm: str
) -> None:
    for port in PROFILES.values():
        assert host.socket(f"tcp://127.0.0.1:{port}").is_listening, port
    # the nspawn VM shares the host's network for now: its sshd listens on the port avm gave it
    ssh_port = urlsplit(inventory.load(golden_home, nspawn_vm).url).port
    assert ssh_port is not None and host.socket(f"tcp://127.0.0.1:{ssh_port}").is_listening
    assert not host.socket("tcp://127.0.0.1:18099").is_listening


def test_the_backend_refuses_a_host_whose_key_is_not_the_pinned_one(
    golden_home: Home, nspawn_vm: str
) -> None:
    """testinfra reaches the host only through avm's transport: a wrong pin is refused."""
    target = inventory.load(golden_home, nspawn_vm)
    assert target.host_key is not None
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    with pytest.raises(AvmError) as info:
        SshTransport.from_target(target.model_copy(update={"host_key": other.decode()}))
    assert info.value.code == "host-key-mismatch"
