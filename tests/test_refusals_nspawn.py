"""Refusals on a real golden host (nspawn: real systemd, real sshd): each leaves the host as it
was and leaves evidence, and `avm status` reads the same from either side of the command.

In order, against one VM: a profile name too long for its Linux user is refused before the host
is touched (even for a commit that an older avm signed); a secret that does not resolve at
--apply is refused with an `apply` receipt that says so; then a real promotion, `status` with
--json after the command, and a drift whose whole path the human table shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from controlplane.governance import secrets
from controlplane.home import Home
from controlplane.promote import pipeline as promotion
from controlplane.release import bundle, cosign
from controlplane.release import trust as signing
from controlplane.transport import inventory
from controlplane.transport.ssh import SshTransport
from tests.plugins.agentrepo import PASSWORD, SECRET_REF, AgentRepo, _commit, copy_example, git
from tests.plugins.vms import run_avm

PROFILES = ("canary", "web", "batch")
LONG_NAME = "n" * 31 + "1"  # 32 characters: agent-<name> would be 38, over useradd's 32


def on_host(home: Home, vm: str, *argv: str) -> tuple[int, str]:
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        result = ssh.run(list(argv), timeout=60)
    return result.rc, result.stdout


def host_state(home: Home, vm: str, profiles: tuple[str, ...] = PROFILES) -> str:
    """Everything a promotion could touch, as one comparable document."""
    with SshTransport.from_target(inventory.load(home, vm)) as ssh:
        gathered = promotion.gather(ssh, list(profiles), [])
        listing = ssh.run(
            ["sh", "-c", "ls -laR /opt/agent /etc/agent 2>&1; ls -la /etc/systemd/system; getent passwd"],
            timeout=60,
        )
    return gathered.model_dump_json() + listing.stdout


def last_receipts(home: Home, n: int) -> list[dict[str, Any]]:
    listed = json.loads(run_avm(home, "--json", "receipts", "list", "--last", str(n)).stdout)["receipts"]
    out = []
    for row in listed:
        shown = json.loads(run_avm(home, "--json", "receipts", "show", str(row["seq"])).stdout)
        out.append({"seq": row["seq"], **shown["statement"]["predicate"]})
    return out


def promote(home: Home, repo: Path, commit: str, vm: str, *extra: str) -> Any:
    return run_avm(home, "--json", "promote", "--repo", str(repo), "--commit", commit, "--target", vm, *extra)


def _signed_as_an_older_avm_did(home: Home, repo: AgentRepo) -> tuple[Path, str]:
    """A commit whose canary profile is named with 32 characters, signed by the trusted release
    key the way avm signed before it validated the manifest (today's `avm sign` refuses it)."""
    path = repo.path.parent / "long-name-agent"
    copy_example(path)
    manifest = path / "avm.yaml"
    manifest.write_text(manifest.read_text().replace("name: canary", f"name: {LONG_NAME}"))
    git(path, "init", "-q", "-b", "main")
    sha = _commit(path, "a profile name too long for its Linux user")
    refused = run_avm(
        home,
        "--json",
        "sign",
        "--repo",
        str(path),
        "--commit",
        sha,
        "--key",
        str(repo.path.parent / "release-key" / "cosign.key"),
        env={"COSIGN_PASSWORD": PASSWORD.decode()},
    )
    assert refused.returncode == 64, refused.stdout + refused.stderr
    assert json.loads(refused.stdout)["error"]["code"] == "manifest-invalid"
    assert not signing.signature_path(home, sha).exists()
    private = cosign.load_private_key(
        (repo.path.parent / "release-key" / "cosign.key").read_bytes(), PASSWORD
    )
    built = bundle.build(path, sha)
    record = {
        "commit": sha,
        "bundle_digest": built.digest,
        "signature": cosign.sign_blob(private, built.data),
        "keyid": cosign.public_key_id(cosign.public_pem_of(private)),
    }
    signing.signature_path(home, sha).write_text(json.dumps(record))
    return path, sha


def test_a_profile_name_too_long_for_its_user_is_refused_before_the_host_is_touched(
    golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str
) -> None:
    path, sha = _signed_as_an_older_avm_did(golden_home, agent_repo)
    before = host_state(golden_home, nspawn_vm)
    out = promote(golden_home, path, sha, nspawn_vm, "--apply")
    assert out.returncode == 64, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "manifest-invalid"
    assert "profiles.0.name" in error["message"] and "agent-<name> is at most 32" in error["message"]
    assert host_state(golden_home, nspawn_vm) == before  # no user, no release, no unit
    assert on_host(golden_home, nspawn_vm, "getent", "passwd", f"agent-{LONG_NAME}")[0] == 2
    (plan,) = last_receipts(golden_home, 1)
    assert (plan["kind"], plan["status"], plan["error"]["code"]) == ("plan", "refused", "manifest-invalid")
    assert error["receipt"] == str(plan["seq"])


@pytest.fixture
def secret_moved_away(golden_home: Home) -> Any:
    """The web profile's secret is not in the store for the length of one test."""
    stored = secrets.store_dir(golden_home, "local") / "web-api-token"
    aside = stored.with_name("web-api-token.aside")
    os.rename(stored, aside)
    try:
        yield
    finally:
        os.rename(aside, stored)


def test_a_secret_that_does_not_resolve_at_apply_is_refused_with_an_apply_receipt(
    golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str, secret_moved_away: None
) -> None:
    before = host_state(golden_home, nspawn_vm)
    dry = promote(golden_home, agent_repo.path, agent_repo.commits["v1"], nspawn_vm)
    assert dry.returncode == 0, dry.stderr  # the plan itself needs no secret value
    out = promote(golden_home, agent_repo.path, agent_repo.commits["v1"], nspawn_vm, "--apply")
    assert out.returncode == 3, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "secret-unresolved"
    assert host_state(golden_home, nspawn_vm) == before
    plan, refused = last_receipts(golden_home, 2)
    assert (plan["kind"], plan["status"], plan["inputs"]["apply"]) == ("plan", "ok", True)
    assert (refused["kind"], refused["status"]) == ("apply", "refused")
    assert refused["error"] == {"code": "secret-unresolved", "message": f"{SECRET_REF} cannot be resolved"}
    assert refused["inputs"]["target"] == nspawn_vm and refused["inputs"]["ref"] == agent_repo.commits["v1"]
    assert error["receipt"] == str(refused["seq"])
    human = run_avm(
        golden_home,
        "promote",
        "--repo",
        str(agent_repo.path),
        "--commit",
        agent_repo.commits["v1"],
        "--target",
        nspawn_vm,
        "--apply",
    )
    assert human.returncode == 3
    seq = last_receipts(golden_home, 1)[0]["seq"]
    assert f"  evidence: receipt #{seq} (`avm receipts show {seq}`)" in human.stderr.splitlines()
    listed = run_avm(golden_home, "receipts", "list", "--last", "1").stdout
    assert listed.split()[2:4] == ["apply", "refused"] and "error[secret-unresolved]" in listed


SOLO_PORT = 18491  # not hello-agent's 18081-18083: nspawn VMs of other runs share the host's ports
SOLO_MANIFEST = f"""\
soak_s: 0
profiles:
  - name: solo
    risk_tier: L1
    canary: true
    entrypoint: [python3, agent.py]
    env: {{GATEWAY_PORT: "{SOLO_PORT}"}}
    health: {{port: {SOLO_PORT}, path: /healthz, timeout_s: 20}}
"""


def _solo_release(home: Home, repo: AgentRepo) -> tuple[Path, str]:
    """A one-profile agent, signed with today's `avm sign` by the trusted release key."""
    path = repo.path.parent / "solo-agent"
    copy_example(path)
    (path / "avm.yaml").write_text(SOLO_MANIFEST)
    git(path, "init", "-q", "-b", "main")
    sha = _commit(path, "solo")
    key = repo.path.parent / "release-key" / "cosign.key"
    signed = run_avm(
        home,
        "sign",
        "--repo",
        str(path),
        "--commit",
        sha,
        "--key",
        str(key),
        env={"COSIGN_PASSWORD": PASSWORD.decode()},
    )
    assert signed.returncode == 0, signed.stdout + signed.stderr
    return path, sha


def test_status_json_after_the_command_and_the_whole_drifted_path(
    golden_home: Home, agent_repo: AgentRepo, nspawn_vm: str
) -> None:
    repo, v1 = _solo_release(golden_home, agent_repo)
    applied = promote(golden_home, repo, v1, nspawn_vm, "--apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    after = run_avm(golden_home, "status", "--target", nspawn_vm, "--json")
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["in_sync"] is True
    path = f"/opt/agent/releases/{v1}/agent.py"  # 69 characters: the old table cut it at 44
    edit = f"cp -p {path} /root/agent.py.bak && chmod u+w {path} && echo '# edited' >> {path}"
    assert on_host(golden_home, nspawn_vm, "sh", "-c", edit)[0] == 0
    try:
        drift = run_avm(golden_home, "status", "--target", nspawn_vm, "--json")
        assert drift.returncode == 2, drift.stdout + drift.stderr
        assert path in [f["where"] for f in json.loads(drift.stdout)["findings"]]
        human = run_avm(golden_home, "status", "--target", nspawn_vm)
        assert human.returncode == 2
        lines = human.stdout.splitlines()
        assert f"  {path}" in lines, human.stdout
        # the path heads each of its findings: the mode made writable, then the content edit
        heads = [i for i, line in enumerate(lines) if line == f"  {path}"]
        assert [lines[i + 1] for i in heads] == [
            "      release entry mode differs (writable)",
            "      release file differs from the signed bundle",
        ]
        below = lines[heads[1] + 1 :]
        assert below[1].startswith("      expected: sha256:") and below[2].startswith(
            "      actual:   sha256:"
        )
    finally:
        assert on_host(golden_home, nspawn_vm, "cp", "-p", "/root/agent.py.bak", path)[0] == 0
    assert run_avm(golden_home, "status", "--target", nspawn_vm).returncode == 0
