"""Receipts verified by tools avm did not write: securesystemslib's DSSE verifier and in-toto-attestation.

A realistic run on a real nspawn golden host (keys, image build and its SLSA provenance, release
key trust, approver trust, an approval, vm up, a dry-run and an applied promotion, status, vm
down) writes every kind the Tier-1 story has; a real microVM job and its egress probe write the
Tier-2 kinds (job-run, job-probe-egress). Together with key-created that is every kind `make
demo` writes. Each stored receipt is checked with nothing but the receipt key's public PEM:
securesystemslib's ``Envelope.verify`` (the DSSE spec's reference library) with a key whose id
follows avm's convention, and in-toto-attestation's Statement v1 validator over the decoded
payload.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

from controlplane.evidence import keys, ledger
from controlplane.home import Home
from tests.plugins.agentrepo import PASSWORD, AgentRepo
from tests.plugins.jobimages import JobEnv
from tests.plugins.vms import needs_root_and_nspawn, run_avm

# golden_home's key is made through the library (no receipt); key-created is checked on its own
KINDS = {
    "image-build",
    "image-provenance",
    "release-key-trusted",
    "approver-trusted",
    "approval",
    "sign",
    "vm-up",
    "plan",
    "rollback-target",
    "apply",
    "status",
    "vm-down",
}


def sslib_key(pub_pem: bytes) -> SSlibKey:
    """The receipt key as securesystemslib sees it: ed25519, raw public key in hex, and the key id
    avm puts in every signature: ``sha256:`` + sha256 of the 32 raw public key bytes."""
    public = serialization.load_pem_public_key(pub_pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    keyid = "sha256:" + hashlib.sha256(raw).hexdigest()
    return SSlibKey(keyid, "ed25519", "ed25519", {"public": raw.hex()})


def third_party_check(stored: bytes, key: SSlibKey) -> dict[str, Any]:
    """Verify one stored receipt with securesystemslib + in-toto-attestation only."""
    envelope = Envelope.from_dict(json.loads(stored))
    accepted = envelope.verify([key], 1)
    assert list(accepted) == [key.keyid]
    assert envelope.payload_type == "application/vnd.in-toto+json"
    proto = json_format.Parse(envelope.payload, statement_pb2.Statement())
    Statement.copy_from_pb(proto).validate()
    doc: dict[str, Any] = json_format.MessageToDict(proto)
    return doc


@pytest.fixture(scope="module")
def realistic_home(
    golden_home: Home, agent_repo: AgentRepo, tmp_path_factory: pytest.TempPathFactory
) -> Home:
    needs_root_and_nspawn()
    work = tmp_path_factory.mktemp("interop")
    env = {"COSIGN_PASSWORD": PASSWORD.decode()}

    def ok(*args: str) -> dict[str, Any]:
        out = run_avm(golden_home, "--json", *args, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    ok("image", "build")
    ok("keys", "release-init", "--out", str(work / "release2"))
    ok("keys", "trust", "--release", str(work / "release2" / "cosign.pub"), "--name", "second")
    ok("keys", "approver-init", "--out", str(work / "approver"))
    ok("keys", "approver-trust", str(work / "approver" / "approver.pub"))
    name = "t" + secrets.token_hex(4)
    ok("vm", "up", name, "--backend", "nspawn", "--timeout", "120")
    try:
        promote = ("promote", "--repo", str(agent_repo.path), "--commit", agent_repo.commits["v1"])
        plan = ok(*promote, "--target", name)
        ok("approve", "--plan", plan["plan_digest"], "--key", str(work / "approver" / "approver.key"))
        ok(*promote, "--target", name, "--apply")
        ok("status", "--target", name)
    finally:
        down = run_avm(golden_home, "vm", "down", name)
        assert down.returncode == 0, down.stdout + down.stderr
    return golden_home


def test_every_receipt_of_a_run_verifies_with_securesystemslib_and_in_toto(realistic_home: Home) -> None:
    key = sslib_key(keys.public_path(realistic_home).read_bytes())
    seen: dict[str, int] = {}
    prev: str | None = None
    for seq, stored in ledger.iter_stored(realistic_home.receipts):
        assert stored is not None, f"receipt #{seq} missing"
        doc = third_party_check(stored, key)
        predicate = doc["predicate"]
        assert doc["predicateType"] == f"https://agent-vm.dev/receipt/{predicate['kind']}/v1"
        assert predicate["seq"] == seq and predicate["prev"] == prev
        prev = hashlib.sha256(stored).hexdigest()
        seen[predicate["kind"]] = seen.get(predicate["kind"], 0) + 1
    assert set(seen) == KINDS, seen


def test_the_key_created_receipt_verifies_too(tmp_path: Path) -> None:
    home = Home(tmp_path / "fresh")
    out = run_avm(home, "--json", "keys", "init")
    assert out.returncode == 0, out.stderr
    key = sslib_key(keys.public_path(home).read_bytes())
    assert json.loads(out.stdout)["keyid"] == key.keyid
    doc = third_party_check(ledger.read(home.receipts, 1), key)
    assert doc["predicate"]["kind"] == "key-created"


def test_the_third_party_verifier_refuses_a_tampered_payload_and_another_key(
    realistic_home: Home, tmp_path: Path
) -> None:
    key = sslib_key(keys.public_path(realistic_home).read_bytes())
    stored = ledger.read(realistic_home.receipts, ledger.last_seq(realistic_home.receipts))
    envelope = json.loads(stored)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["predicate"]["status"] = "ok" if payload["predicate"]["status"] != "ok" else "failed"
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(VerificationError):
        Envelope.from_dict(envelope).verify([key], 1)
    other = Home(tmp_path / "other").ensure()
    keys.init(other)
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(stored)).verify([sslib_key(keys.public_path(other).read_bytes())], 1)


def test_tier2_job_receipts_verify_with_securesystemslib_and_in_toto(jobenv: JobEnv) -> None:
    spec = jobenv.spec("interop", id="interop", command=["sh", "-c", "echo interop"])
    for command in ("run", "probe-egress"):
        out = run_avm(jobenv.home, "--json", "job", command, str(spec))
        assert out.returncode == 0, out.stdout + out.stderr
    key = sslib_key(keys.public_path(jobenv.home).read_bytes())
    kinds = set()
    for seq, stored in ledger.iter_stored(jobenv.home.receipts):
        assert stored is not None, f"receipt #{seq} missing"
        kinds.add(third_party_check(stored, key)["predicate"]["kind"])
    assert {"job-run", "job-probe-egress"} <= kinds, kinds
