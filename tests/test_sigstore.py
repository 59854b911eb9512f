"""Sigstore trust beyond the conformance table: identity policy, CI commit binding, avm's own
key-pair and transparency-log checks (on the public conformance bundle, mutated at test time),
the pinned shipped root, and releases signed with Sigstore bundles."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import RefusedError
from controlplane.evidence import keys, ledger
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import open_receipt
from controlplane.home import Home
from controlplane.image import sign as imagesign
from controlplane.jobs.oci import store as ocistore
from controlplane.release import bundle, cosign, sigstorebundle, sigstoretrust
from controlplane.release import trust as signing

BASE = Path(__file__).resolve().parent / "fixtures" / "sigstore-conformance" / "bundle-verify"
A_TXT = (BASE / "a.txt").read_bytes()
BEACON_REPO = "sigstore-conformance/extremely-dangerous-public-oidc-beacon"
BEACON = (
    f"https://github.com/{BEACON_REPO}/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main"
)
GHA = "https://token.actions.githubusercontent.com"
BEACON_SHA = "c7b3dfb335f051e1c86bda4c716fac97df62ad81"  # in happy-path-v0.3's certificate
MANAGED = json.loads((BASE / "managed-key-happy-path" / "bundle.sigstore.json").read_bytes())
MANAGED_PEM = (BASE / "managed-key-happy-path" / "key.pub").read_bytes()
KEYS = {cosign.public_key_id(MANAGED_PEM): MANAGED_PEM}


def keyless(
    raw: bytes, who: list[sigstorebundle.TrustedIdentity], commit: str | None = None
) -> dict[str, Any]:
    return sigstorebundle.verify(A_TXT, raw, identities=who, release_keys={}, commit=commit).material


def refused(fn: Any) -> RefusedError:
    with pytest.raises(RefusedError) as info:
        fn()
    return info.value


HAPPY = (BASE / "happy-path-v0.3" / "bundle.sigstore.json").read_bytes()


def test_keyless_identity_and_issuer_must_both_match() -> None:
    ok = keyless(HAPPY, [sigstorebundle.TrustedIdentity(BEACON, GHA)])
    assert ok["identity"] == BEACON and ok["trusted_root"] == "sha256:" + sigstorebundle.SHIPPED_ROOT_SHA256
    other = refused(lambda: keyless(HAPPY, [sigstorebundle.TrustedIdentity("evil@example.com", GHA)]))
    assert other.code == "sigstore-identity-mismatch"
    assert other.details["actual"] == {"san": [BEACON]}
    issuer = refused(
        lambda: keyless(HAPPY, [sigstorebundle.TrustedIdentity(BEACON, "https://accounts.google.com")])
    )
    assert issuer.code == "sigstore-identity-mismatch"
    assert refused(lambda: keyless(HAPPY, [])).code == "sigstore-identity-untrusted"


def test_a_ci_identity_is_bound_to_its_repository_and_the_exact_commit() -> None:
    ci = sigstorebundle.TrustedIdentity(BEACON, GHA, repository=BEACON_REPO)
    ok = keyless(HAPPY, [ci], commit=BEACON_SHA)
    assert (ok["repository"], ok["commit"]) == (BEACON_REPO, BEACON_SHA)
    assert refused(lambda: keyless(HAPPY, [ci], commit="0" * 40)).code == "sigstore-identity-mismatch"
    elsewhere = sigstorebundle.TrustedIdentity(BEACON, GHA, repository="sigstore/other")
    assert (
        refused(lambda: keyless(HAPPY, [elsewhere], commit=BEACON_SHA)).code == "sigstore-identity-mismatch"
    )


def test_a_tampered_shipped_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = json.loads(sigstorebundle.SHIPPED_ROOT.read_bytes())
    root["tlogs"] = root["tlogs"][:1]
    fake = tmp_path / "trusted_root.json"
    fake.write_text(json.dumps(root))
    monkeypatch.setattr(sigstorebundle, "SHIPPED_ROOT", fake)
    error = refused(lambda: keyless(HAPPY, [sigstorebundle.TrustedIdentity(BEACON, GHA)]))
    assert error.code == "sigstore-trusted-root-mismatch"
    assert error.details["expected"] == sigstorebundle.SHIPPED_ROOT_SHA256


def keyed(doc: dict[str, Any], artifact: bytes = A_TXT, root: Path | None = None) -> dict[str, Any]:
    raw = json.dumps(doc).encode()
    return sigstorebundle.verify(artifact, raw, identities=[], release_keys=KEYS, trusted_root=root).material


def mutate(path: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(MANAGED)
    node: Any = doc
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key: Any = int(last) if last.isdigit() else last
    node[key] = value(node[key]) if callable(value) else value
    return doc


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[-1] ^= 1
    return base64.b64encode(bytes(raw)).decode()


ENTRY = "verificationMaterial.tlogEntries.0"
TLOG_TAMPERING = {
    "proof-hash": (f"{ENTRY}.inclusionProof.hashes.3", _flip, "sigstore-tlog-invalid"),
    "root-hash": (f"{ENTRY}.inclusionProof.rootHash", _flip, "sigstore-tlog-invalid"),
    "tree-size": (f"{ENTRY}.inclusionProof.treeSize", lambda v: str(int(v) + 1), "sigstore-tlog-invalid"),
    "checkpoint": (
        f"{ENTRY}.inclusionProof.checkpoint.envelope",
        lambda v: v.replace("\n\n", "\nextra\n\n", 1),
        "sigstore-tlog-invalid",
    ),
    "set": (f"{ENTRY}.inclusionPromise.signedEntryTimestamp", _flip, "sigstore-tlog-invalid"),
    "integrated-time": (f"{ENTRY}.integratedTime", lambda v: str(int(v) + 1), "sigstore-tlog-invalid"),
    "log-id": (f"{ENTRY}.logId.keyId", _flip, "sigstore-tlog-untrusted"),
    "entry-kind": (
        f"{ENTRY}.kindVersion",
        {"kind": "intoto", "version": "0.0.2"},
        "sigstore-tlog-unsupported",
    ),
    "no-proof": (f"{ENTRY}.inclusionProof", None, "sigstore-tlog-invalid"),
    "signature": ("messageSignature.signature", _flip, "sigstore-key-untrusted"),
    "digest": ("messageSignature.messageDigest.digest", _flip, "sigstore-digest-mismatch"),
}


def test_avm_checks_the_key_pair_bundle_and_its_log_entry() -> None:
    ok = keyed(MANAGED)
    assert ok["keyid"] == next(iter(KEYS)) and ok["tlog"]["log_index"] == int(MANAGED_LOG_INDEX)
    assert refused(lambda: keyed(MANAGED, b"another artifact")).code == "sigstore-digest-mismatch"


MANAGED_LOG_INDEX = MANAGED["verificationMaterial"]["tlogEntries"][0]["logIndex"]


@pytest.mark.parametrize("case", sorted(TLOG_TAMPERING))
def test_each_change_to_a_key_pair_bundle_is_refused(case: str) -> None:
    path, value, code = TLOG_TAMPERING[case]
    assert refused(lambda: keyed(mutate(path, value))).code == code


def test_the_log_body_must_name_this_artifact_signature_and_key() -> None:
    body = json.loads(
        base64.b64decode(MANAGED["verificationMaterial"]["tlogEntries"][0]["canonicalizedBody"])
    )
    body["spec"]["data"]["hash"]["value"] = "0" * 64
    doc = mutate(f"{ENTRY}.canonicalizedBody", base64.b64encode(json.dumps(body).encode()).decode())
    assert refused(lambda: keyed(doc)).code == "sigstore-tlog-mismatch"


def test_a_log_not_in_the_trusted_root_is_refused(tmp_path: Path) -> None:
    root = json.loads(sigstorebundle.SHIPPED_ROOT.read_bytes())
    root["tlogs"] = []
    path = tmp_path / "root.json"
    path.write_text(json.dumps(root))
    assert refused(lambda: keyed(MANAGED, root=path)).code == "sigstore-tlog-untrusted"


# -- releases ---------------------------------------------------------------------------------

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, env=GIT_ENV, check=True)
    return out.stdout.decode().strip()


def key_bundle(private: Any, pem: bytes, data: bytes) -> bytes:
    """A key-pair Sigstore bundle v0.3 as `cosign sign-blob --key --bundle` writes one (no log)."""
    doc = {
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": cosign.public_key_id(pem)}, "tlogEntries": []},
        "messageSignature": {
            "messageDigest": {
                "algorithm": "SHA2_256",
                "digest": base64.b64encode(hashlib.sha256(data).digest()).decode(),
            },
            "signature": cosign.sign_blob(private, data),
        },
    }
    return json.dumps(doc).encode()


def test_a_release_signed_with_a_key_pair_bundle_is_stored_and_gates_promotion(
    tmp_path: Path, home: Home
) -> None:
    keys.init(home)
    repo = tmp_path / "agent"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "agent.py").write_text("print('v1')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    v1 = git(repo, "rev-parse", "HEAD")
    (repo / "agent.py").write_text("print('v2')\n")
    git(repo, "commit", "-qam", "v2")
    v2 = git(repo, "rev-parse", "HEAD")
    password = b"pw"
    key_pem, pub_pem = cosign.generate_keypair(password)
    private = cosign.load_private_key(key_pem, password)
    (tmp_path / "cosign.pub").write_bytes(pub_pem)
    signing.trust_release_key(home, tmp_path / "cosign.pub", "ci")
    good = tmp_path / "v1.sigstore.json"

    def avm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controlplane", "--home", str(home.root), "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # what CI signs: the release bundle tar, exported without any key
    export = avm("sign", "--repo", str(repo), "--commit", v1, "--bundle-out", str(tmp_path / "v1.tar"))
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "v1.tar").read_bytes() == bundle.build(repo, v1).data
    assert not signing.signature_path(home, v1).exists()
    good.write_bytes(key_bundle(private, pub_pem, (tmp_path / "v1.tar").read_bytes()))
    # the bundle of v1 is not a bundle of v2: refused, nothing stored
    wrong = avm("sign", "--repo", str(repo), "--commit", v2, "--sigstore-bundle", str(good))
    assert wrong.returncode == 3, wrong.stderr
    assert json.loads(wrong.stdout)["error"]["code"] == "sigstore-digest-mismatch"
    assert not sigstoretrust.bundle_path(home, v2).exists()
    out = avm("sign", "--repo", str(repo), "--commit", v1, "--sigstore-bundle", str(good))
    assert out.returncode == 0, out.stderr
    assert sigstoretrust.bundle_path(home, v1).read_bytes() == good.read_bytes()
    _, _, statement = open_receipt(ledger.read(home.receipts, ledger.last_seq(home.receipts)))
    assert statement.predicate.kind == "sign"
    assert statement.predicate.result["trust"]["keyid"] == cosign.public_key_id(pub_pem)
    # promotion's signature gate uses the stored bundle and records the key id it trusted
    step = evidence.Step("plan", {})
    described = sigstoretrust.verify_signature_gate(home, bundle.build(repo, v1), step)
    assert described == f"sigstore key {cosign.public_key_id(pub_pem)}"
    gate = step.events[0]
    assert (gate["gate"], gate["method"], gate["keyid"]) == (
        "signature",
        "sigstore-key",
        cosign.public_key_id(pub_pem),
    )
    assert gate["trusted_root"] == "sha256:" + sigstorebundle.SHIPPED_ROOT_SHA256
    # a stored bundle that no longer verifies (the key is no longer trusted) refuses promotion
    for path in signing.trusted_dir(home).iterdir():
        path.unlink()
    gone = refused(
        lambda: sigstoretrust.verify_signature_gate(home, bundle.build(repo, v1), evidence.Step("plan", {}))
    )
    assert gone.code == "sigstore-key-untrusted"


def test_keys_trust_sigstore_identity_records_identity_issuer_and_root(home: Home) -> None:
    keys.init(home)

    def avm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controlplane", "--home", str(home.root), "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = avm("keys", "trust", "--sigstore-identity", BEACON)
    assert missing.returncode == 64
    assert json.loads(missing.stdout)["error"]["code"] == "sigstore-issuer-required"
    out = avm("keys", "trust", "--sigstore-identity", BEACON, "--issuer", GHA, "--repository", BEACON_REPO)
    assert out.returncode == 0, out.stderr
    assert sigstoretrust.trusted_identities(home) == [
        sigstorebundle.TrustedIdentity(BEACON, GHA, BEACON_REPO)
    ]
    _, _, statement = open_receipt(ledger.read(home.receipts, ledger.last_seq(home.receipts)))
    assert statement.predicate.kind == "sigstore-identity-trusted"
    assert statement.predicate.result == {
        "identity": BEACON,
        "issuer": GHA,
        "repository": BEACON_REPO,
        "trusted_root": "sha256:" + sigstorebundle.SHIPPED_ROOT_SHA256,
    }
    # the CLI verifies a CI-signed file only with the exact commit
    bundle_file = str(BASE / "happy-path-v0.3" / "bundle.sigstore.json")
    ok = avm("verify-bundle", str(BASE / "a.txt"), "--bundle", bundle_file, "--commit", BEACON_SHA)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["commit"] == BEACON_SHA
    other = avm("verify-bundle", str(BASE / "a.txt"), "--bundle", bundle_file, "--commit", "1" * 40)
    assert other.returncode == 3
    assert json.loads(other.stdout)["error"]["code"] == "sigstore-identity-mismatch"


def test_a_tier2_image_signed_with_a_sigstore_bundle(tmp_path: Path, home: Home) -> None:
    keys.init(home)
    (tmp_path / "hello").write_text("hi\n")
    image = ocistore.build_job_image(home, "avm/bundle-test", {"/hello": tmp_path / "hello"})
    other = ocistore.build_job_image(home, "avm/other", {"/other": tmp_path / "hello"})
    password = b"pw"
    key_pem, pub_pem = cosign.generate_keypair(password)
    private = cosign.load_private_key(key_pem, password)
    (tmp_path / "cosign.pub").write_bytes(pub_pem)
    signing.trust_release_key(home, tmp_path / "cosign.pub", "ci")
    good = tmp_path / "image.sigstore.json"
    good.write_bytes(key_bundle(private, pub_pem, imagesign.payload(image.name, image.digest)))

    def avm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controlplane", "--home", str(home.root), "--json", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    wrong = avm("image", "sign", other.ref, "--sigstore-bundle", str(good))
    assert wrong.returncode == 3, wrong.stderr
    assert json.loads(wrong.stdout)["error"]["code"] == "sigstore-digest-mismatch"
    assert not imagesign.sigstore_bundle_file(home, other.digest).exists()
    out = avm("image", "sign", image.ref, "--sigstore-bundle", str(good))
    assert out.returncode == 0, out.stderr
    assert imagesign.sigstore_bundle_file(home, image.digest).read_bytes() == good.read_bytes()
    # the job gate's check: the bundle over the payload rebuilt from the pin, with a trusted key
    assert (
        imagesign.verify_image(home, image.name, image.digest)
        == f"sigstore key {cosign.public_key_id(pub_pem)}"
    )
    with pytest.raises(RefusedError) as info:
        imagesign.verify_image(home, "avm/renamed", image.digest)  # the payload names the reference
    assert info.value.code == "sigstore-digest-mismatch"
