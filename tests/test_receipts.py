"""Receipts: signed, hash-chained, atomic; verify refuses each kind of tampering with its own code."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from controlplane.errors import OperationalError, RefusedError, UsageError
from controlplane.evidence import keys, ledger, verify
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import open_receipt, pae, seal
from controlplane.home import Home

AVM = [sys.executable, "-m", "controlplane"]


def avm(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AVM, "--home", str(home.root), *args], capture_output=True, text=True, timeout=60, check=False
    )


def write_steps(home: Home, n: int, kind: str = "test") -> None:
    for i in range(n):
        with evidence.record_step(home, kind, inputs={"i": i}) as step:
            step.subject(f"thing-{i}", "sha256:" + f"{i:064x}")


@pytest.fixture
def chain(home: Home) -> Home:
    keys.init(home)
    write_steps(home, 6)
    return home


def trusted(home: Home) -> keys.TrustedKeys:
    return keys.load_trusted([keys.public_path(home)])


def refused_code(home: Home) -> str:
    with pytest.raises(RefusedError) as info:
        verify.verify(trusted(home), directory=home.receipts)
    return info.value.code


def test_keys_init_writes_0600_key_and_a_key_created_receipt(home: Home) -> None:
    out = avm(home, "--json", "keys", "init")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert keys.private_path(home).stat().st_mode & 0o777 == 0o600
    shown = json.loads(avm(home, "--json", "receipts", "show", "1").stdout)
    statement = shown["statement"]
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicate"]["kind"] == "key-created"
    assert statement["subject"][0]["digest"]["sha256"] == doc["keyid"].removeprefix("sha256:")
    # a second init refuses and keeps the key
    before = keys.private_path(home).read_bytes()
    again = avm(home, "keys", "init")
    assert again.returncode == 3 and "key-exists" in again.stderr
    assert keys.private_path(home).read_bytes() == before


def test_receipt_is_canonical_dsse_in_toto_with_prev_digest(chain: Home) -> None:
    first = ledger.read(chain.receipts, 1)
    second = ledger.read(chain.receipts, 2)
    envelope, payload, statement = open_receipt(second)
    assert statement.predicate.prev == hashlib.sha256(first).hexdigest()
    # the signature is ed25519 over DSSE PAE of the exact payload bytes
    signer = keys.load_signer(chain)
    signer.private.public_key().verify(
        base64.b64decode(envelope.signatures[0].sig), pae(envelope.payloadType, payload)
    )
    assert statement.predicateType == "https://agent-vm.dev/receipt/test/v1"


def test_verify_ok_via_cli_and_bundle(chain: Home, tmp_path: Path) -> None:
    out = avm(chain, "--json", "receipts", "verify")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["receipts"] == 6
    bundle = tmp_path / "chain.jsonl"
    assert avm(chain, "receipts", "export", "--out", str(bundle)).returncode == 0
    assert len(bundle.read_bytes().splitlines()) == 6
    pub = tmp_path / "auditor.pub"
    shutil.copy(keys.public_path(chain), pub)
    head = doc["head"]["digest"]
    ok = avm(chain, "receipts", "verify", "--bundle", str(bundle), "--key", str(pub), "--expect-head", head)
    assert ok.returncode == 0, ok.stderr
    wrong = avm(
        chain, "receipts", "verify", "--bundle", str(bundle), "--key", str(pub), "--expect-head", "0" * 64
    )
    assert wrong.returncode == 3 and "receipt-head-mismatch" in wrong.stderr


def _swap_b64_char(data: bytes) -> bytes:
    doc = json.loads(data)
    payload = doc["payload"]
    i = len(payload) // 2
    doc["payload"] = payload[:i] + ("A" if payload[i] != "A" else "B") + payload[i + 1 :]
    from controlplane.canonical import canonical_bytes

    return canonical_bytes(doc)


def _other_key_receipt(home: Home, tmp_path: Path, seq: int) -> bytes:
    """A receipt at the right place and link, but signed by a key the auditor does not trust."""
    rogue = Home(tmp_path / "rogue").ensure()
    keys.init(rogue)
    original = open_receipt(ledger.read(home.receipts, seq))[2]
    return seal(original, keys.load_signer(rogue))


def _insert_at(home: Home, seq: int) -> None:
    """Someone holding the key splices a new, validly signed receipt in at ``seq``."""
    directory = home.receipts
    head = ledger.read_head(directory)
    for n in range(head.seq, seq - 1, -1):
        os.rename(ledger.receipt_path(directory, n), ledger.receipt_path(directory, n + 1))
    prev = ledger.receipt_path(directory, seq - 1).read_bytes()
    step = evidence.Step("forged", {})
    step.subject("forged", "sha256:" + "f" * 64)
    timing = {
        "started": "2026-01-01T00:00:00.000Z",
        "finished": "2026-01-01T00:00:00.000Z",
        "duration_s": 0.0,
    }
    from controlplane.evidence.receipt import digest_of

    data = seal(step.statement(seq, digest_of(prev), "ok", timing), keys.load_signer(home))
    ledger.receipt_path(directory, seq).write_bytes(data)


def _swap(home: Home, a: int, b: int) -> None:
    pa, pb = ledger.receipt_path(home.receipts, a), ledger.receipt_path(home.receipts, b)
    tmp = pa.with_suffix(".swap")
    os.rename(pa, tmp)
    os.rename(pb, pa)
    os.rename(tmp, pb)


TAMPERING: dict[str, Callable[[Home, Path], object]] = {
    "edited-byte": lambda h, t: ledger.receipt_path(h.receipts, 3).write_bytes(
        _swap_b64_char(ledger.read(h.receipts, 3))
    ),
    "deleted": lambda h, t: ledger.receipt_path(h.receipts, 3).unlink(),
    "deleted-last": lambda h, t: ledger.receipt_path(h.receipts, 6).unlink(),
    "inserted": lambda h, t: _insert_at(h, 3),
    "reordered": lambda h, t: _swap(h, 3, 4),
    "reordered-far": lambda h, t: _swap(h, 2, 5),  # not adjacent: #2 turns up three receipts later
    "other-key": lambda h, t: ledger.receipt_path(h.receipts, 4).write_bytes(_other_key_receipt(h, t, 4)),
    "truncated": lambda h, t: ledger.receipt_path(h.receipts, 5).write_bytes(
        ledger.read(h.receipts, 5)[:-40]
    ),
    "empty-file": lambda h, t: ledger.receipt_path(h.receipts, 5).write_bytes(b""),
    "non-canonical": lambda h, t: ledger.receipt_path(h.receipts, 2).write_bytes(
        json.dumps(json.loads(ledger.read(h.receipts, 2)), indent=1).encode()
    ),
}
EXPECTED = {
    "edited-byte": "receipt-signature-invalid",
    "deleted": "receipt-missing",
    "deleted-last": "receipt-missing",
    "inserted": "receipt-inserted",
    "reordered": "receipt-out-of-order",
    "reordered-far": "receipt-out-of-order",
    "other-key": "receipt-untrusted-key",
    "truncated": "receipt-truncated",
    "empty-file": "receipt-truncated",
    "non-canonical": "receipt-malformed",
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_verify_refuses_each_tampering_with_its_own_code(case: str, chain: Home, tmp_path: Path) -> None:
    assert verify.verify(trusted(chain), directory=chain.receipts).count == 6
    TAMPERING[case](chain, tmp_path)
    assert refused_code(chain) == EXPECTED[case]
    out = avm(chain, "receipts", "verify")
    assert out.returncode == 3
    assert f"error[{EXPECTED[case]}]" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("case", ["edited-byte", "reordered", "reordered-far", "truncated", "inserted"])
def test_bundle_tampering_is_caught_too(case: str, chain: Home, tmp_path: Path) -> None:
    TAMPERING[case](chain, tmp_path)
    bundle = tmp_path / "b.jsonl"
    with bundle.open("wb") as out:
        for n in range(1, 8):
            path = ledger.receipt_path(chain.receipts, n)
            if path.exists():
                out.write(path.read_bytes() + b"\n")
    with pytest.raises(RefusedError) as info:
        verify.verify(trusted(chain), bundle=bundle)
    assert info.value.code == EXPECTED[case]


def test_failed_and_refused_steps_are_recorded_and_propagate(chain: Home) -> None:
    with pytest.raises(RefusedError), evidence.record_step(chain, "gate") as step:
        step.check("signature", ok=False, detail="untrusted key")
        raise RefusedError("signature-untrusted-key", "no")
    with pytest.raises(ZeroDivisionError), evidence.record_step(chain, "boom", inputs={"a": 1}):
        _ = 1 / 0
    refused = open_receipt(ledger.read(chain.receipts, 7))[2].predicate
    failed = open_receipt(ledger.read(chain.receipts, 8))[2].predicate
    assert refused.status == "refused" and refused.error == {
        "code": "signature-untrusted-key",
        "message": "no",
    }
    assert refused.checks[0].ok is False
    assert failed.status == "failed" and failed.error is not None and failed.error["code"] == "internal"
    assert verify.verify(trusted(chain), directory=chain.receipts).count == 8


def test_no_key_means_the_step_does_not_run(home: Home) -> None:
    ran = []
    with pytest.raises(OperationalError) as info, evidence.record_step(home, "x"):
        ran.append(1)
    assert info.value.code == "key-missing" and ran == []
    assert ledger.count_files(home.receipts) == 0


def test_crash_mid_write_leaves_no_half_receipt(chain: Home) -> None:
    # a writer killed before its rename leaves only a temp file, which is never part of the chain
    (chain.receipts / ".00000007.json.k3x9q1.part").write_bytes(b'{"payload":"eyJf')
    # a writer killed after the rename but before HEAD moved: the receipt is complete; adopt it
    head = ledger.read_head(chain.receipts)
    (chain.receipts / "HEAD").write_text(json.dumps({"seq": head.seq - 1, "digest": "stale"}))
    write_steps(chain, 1)
    report = verify.verify(trusted(chain), directory=chain.receipts)
    assert report.count == 7


def _worker(root: str, n: int) -> None:
    home = Home(Path(root))
    for i in range(n):
        with evidence.record_step(home, "concurrent", inputs={"pid": os.getpid(), "i": i}) as step:
            step.subject("w", "sha256:" + "0" * 64)


def test_concurrent_writers_in_separate_processes_make_one_valid_chain(home: Home) -> None:
    keys.init(home)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(home.root), 25)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    report = verify.verify(trusted(home), directory=home.receipts)
    assert report.count == 100
    assert report.kinds == {"concurrent": 100}
    assert not list(home.receipts.glob(".*.part"))  # the writer's temporaries (_internal.fs)


def test_show_by_digest_prefix_and_list(chain: Home) -> None:
    doc = json.loads(avm(chain, "--json", "receipts", "show", "2").stdout)
    by_digest = json.loads(avm(chain, "--json", "receipts", "show", doc["digest"][:12]).stdout)
    assert by_digest["seq"] == 2
    listed = json.loads(avm(chain, "--json", "receipts", "list", "--last", "2").stdout)
    assert [r["seq"] for r in listed["receipts"]] == [5, 6]
    missing = avm(chain, "receipts", "show", "99")
    assert missing.returncode == 1 and "error[receipt-not-found]" in missing.stderr


def test_verify_with_unreadable_key_is_a_usage_error(chain: Home, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    out = avm(chain, "receipts", "verify", "--key", str(bad))
    assert out.returncode == 64 and "error[key-unreadable]" in out.stderr


def test_usage_refusals_are_recorded_as_refused_and_listed_with_their_code(chain: Home) -> None:
    with pytest.raises(UsageError), evidence.record_step(chain, "gate", inputs={"profile": "x" * 40}):
        raise UsageError("invalid-profile-name", "too long")
    predicate = open_receipt(ledger.read(chain.receipts, 7))[2].predicate
    assert predicate.status == "refused"
    assert predicate.error == {"code": "invalid-profile-name", "message": "too long"}
    out = avm(chain, "receipts", "list", "--last", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[2:4] == ["gate", "refused"]
    assert out.stdout.rstrip().endswith("error[invalid-profile-name]")


def test_an_error_raised_between_steps_gets_its_own_receipt_once(chain: Home) -> None:
    refusal = RefusedError("secret-unresolved", "secret://local/x cannot be resolved")
    evidence.record_unrecorded(chain, "apply", refusal, inputs={"target": "t"})
    assert refusal.receipt == "7"
    evidence.record_unrecorded(chain, "apply", refusal)  # already recorded: no second receipt
    assert ledger.last_seq(chain.receipts) == 7
    predicate = open_receipt(ledger.read(chain.receipts, 7))[2].predicate
    assert (predicate.kind, predicate.status, predicate.inputs) == ("apply", "refused", {"target": "t"})
    assert predicate.error == {"code": "secret-unresolved", "message": "secret://local/x cannot be resolved"}
    # an error a step recorded names that step's receipt, and is not recorded again
    with pytest.raises(OperationalError) as info, evidence.record_step(chain, "apply"):
        raise OperationalError("host-unreachable", "no route")
    assert info.value.receipt == "8"
    evidence.record_unrecorded(chain, "apply", info.value)
    assert ledger.last_seq(chain.receipts) == 8
    assert verify.verify(trusted(chain), directory=chain.receipts).count == 8


def test_verify_in_a_home_without_a_key_says_so_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "never-made"
    out = subprocess.run(
        [*AVM, "--home", str(root), "receipts", "verify"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 64, out.stderr
    assert out.stderr.splitlines()[0] == (
        f"error[no-trusted-key]: there is no receipt key in {root} yet, so there is nothing to verify against"
    )
    assert "`avm keys init`" in out.stderr
    assert "Errno" not in out.stderr and "No such file" not in out.stderr
    assert not root.exists()


@pytest.mark.parametrize(
    ("args", "rc"),
    [
        (["receipts", "list"], 0),
        (["receipts", "show", "1"], 1),  # receipt-not-found
        (["receipts", "verify"], 64),  # no-trusted-key
        (["status", "--target", "demo"], 64),  # unknown-target
    ],
)
def test_read_only_commands_do_not_create_the_home(tmp_path: Path, args: list[str], rc: int) -> None:
    root = tmp_path / "never-made"
    out = subprocess.run([*AVM, "--home", str(root), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == rc, out.stderr
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))


def test_reading_a_malformed_receipt_refuses_like_verify_exit_3(chain: Home, tmp_path: Path) -> None:
    """`receipt-malformed` is one class: `receipts verify` refused it (3), `receipts list` exited 1
    with it and `receipts show` crashed with a traceback. All three refuse now; the file is kept."""
    TAMPERING["non-canonical"](chain, tmp_path)
    damaged = ledger.read(chain.receipts, 2)
    for args in (("receipts", "show", "2"), ("receipts", "list"), ("receipts", "verify")):
        out = avm(chain, *args)
        assert out.returncode == 3, (args, out.stderr)
        assert "error[receipt-malformed]" in out.stderr and "Traceback" not in out.stderr
    assert ledger.read(chain.receipts, 2) == damaged
