"""Tier-1 release supply chain: git refs, deterministic bundles, cosign-compatible signatures.

Real git repositories made in tmp_path, real keys generated at test time, the real CLI in a
subprocess. No fixture from the real cosign binary is available here (it cannot be installed and
the lab notes carry no key/signature bytes), so interop is checked against the formats the lab
verified with real cosign output: the encrypted key opens with scrypt + NaCl secretbox exactly as
described, and signatures verify with plain `cryptography` as `cosign verify-blob` does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import AvmError, RefusedError, UsageError
from controlplane.evidence import keys as receipt_keys
from controlplane.home import Home
from controlplane.release import bundle, cosign, git
from controlplane.release import trust as signing
from controlplane.release.manifest import parse_manifest

PASSWORD = "correct horse battery staple"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def sh_git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **GIT_ENV},
        check=True,
    )
    return out.stdout.decode().strip()


def commit_all(repo: Path, message: str) -> str:
    sh_git(repo, "add", "-A")
    sh_git(repo, "commit", "-q", "-m", message)
    return sh_git(repo, "rev-parse", "HEAD")


VALID_MANIFEST = """\
profiles:
  - name: web
    risk_tier: L1
    entrypoint: [python3, agent.py]
    health: {port: 8081}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An agent repo with a regular file, an executable, a symlink, a nested and a pinned file,
    and a valid release manifest (signing refuses a commit that could never be promoted)."""
    path = tmp_path / "agent"
    path.mkdir()
    sh_git(path, "init", "-q", "-b", "main")
    (path / "agent.py").write_text("print('hello')\n")
    (path / "avm.yaml").write_text(VALID_MANIFEST)
    (path / "run.sh").write_text("#!/bin/sh\nexec python3 agent.py\n")
    (path / "run.sh").chmod(0o755)
    (path / "model").mkdir()
    (path / "model" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (path / "latest").symlink_to("model/weights.bin")
    commit_all(path, "first")
    sh_git(path, "tag", "v1")
    return path


@pytest.fixture(scope="module")
def keypair() -> tuple[bytes, bytes]:
    return cosign.generate_keypair(PASSWORD.encode())


@pytest.fixture(scope="module")
def other_keypair() -> tuple[bytes, bytes]:
    return cosign.generate_keypair(b"other")


def write_key(tmp_path: Path, pair: tuple[bytes, bytes], name: str = "release") -> tuple[Path, Path]:
    key, pub = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
    key.write_bytes(pair[0])
    pub.write_bytes(pair[1])
    return key, pub


@pytest.fixture
def signing_home(home: Home) -> Home:
    receipt_keys.init(home)
    return home


def code_of(exc: pytest.ExceptionInfo[AvmError]) -> str:
    return exc.value.code


# -- git refs ------------------------------------------------------------------------------------


def test_resolve_full_short_branch_and_tag(repo: Path) -> None:
    head = sh_git(repo, "rev-parse", "HEAD")
    assert git.resolve(repo, "HEAD") == head
    assert git.resolve(repo, "main") == head
    assert git.resolve(repo, "v1") == head
    assert git.resolve(repo, head) == head
    assert git.resolve(repo, head[:7]) == head


def test_annotated_tag_resolves_to_its_commit(repo: Path) -> None:
    sh_git(repo, "tag", "-a", "v1.0", "-m", "release")
    assert git.resolve(repo, "v1.0") == sh_git(repo, "rev-parse", "HEAD")


@pytest.mark.parametrize("ref", ["nope", "deadbeef", "0" * 40, "main~5"])
def test_unknown_ref_is_refused(repo: Path, ref: str) -> None:
    with pytest.raises(RefusedError) as exc:
        git.resolve(repo, ref)
    assert exc.value.code == "ref-unknown"
    assert exc.value.exit_code == 3


def test_ambiguous_short_sha_is_refused(repo: Path) -> None:
    # Two commit objects whose SHAs share a 4-hex prefix: found by hashing candidates in
    # Python (a birthday search over ~300 bodies), then written into the repo.
    empty_tree = sh_git(repo, "hash-object", "-t", "tree", "-w", "--stdin", stdin=b"")
    seen: dict[str, bytes] = {}
    pair: tuple[bytes, bytes] | None = None
    for i in range(100_000):
        body = (
            f"tree {empty_tree}\nauthor T <t@e> 0 +0000\ncommitter T <t@e> 0 +0000\n\ncandidate {i}\n"
        ).encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body, usedforsecurity=False).hexdigest()
        if sha[:4] in seen:
            pair = (seen[sha[:4]], body)
            prefix = sha[:4]
            break
        seen[sha[:4]] = body
    assert pair is not None
    for body in pair:
        sh_git(repo, "hash-object", "-t", "commit", "-w", "--stdin", stdin=body)
    with pytest.raises(RefusedError) as exc:
        git.resolve(repo, prefix)
    assert exc.value.code == "ref-ambiguous"


def _second_commit(repo: Path) -> str:
    (repo / "agent.py").write_text("print('hello again')\n")
    return commit_all(repo, "second")


@pytest.mark.parametrize("same_commit", [False, True])
def test_tag_and_branch_of_the_same_name_are_ambiguous(repo: Path, same_commit: bool) -> None:
    first = git.resolve(repo, "refs/tags/v1")
    second = _second_commit(repo)
    sh_git(repo, "branch", "v1", first if same_commit else second)
    with pytest.raises(RefusedError) as exc:
        git.resolve(repo, "v1")
    assert exc.value.code == "ref-ambiguous" and exc.value.exit_code == 3
    branch_at = first if same_commit else second
    assert exc.value.details["candidates"] == [
        f"refs/heads/v1: commit {branch_at}",
        f"refs/tags/v1: commit {first}",
    ]
    assert exc.value.details["git_warning"] == ["warning: refname 'v1' is ambiguous."]
    with pytest.raises(RefusedError) as exc:  # a suffix does not make the base unambiguous
        git.resolve(repo, "v1~0")
    assert exc.value.code == "ref-ambiguous"
    # exact spellings still work: the full SHA and the full ref names
    assert git.resolve(repo, first) == first
    assert git.resolve(repo, "refs/tags/v1") == first
    assert git.resolve(repo, "refs/heads/v1") == branch_at


def test_branch_named_like_another_commits_short_sha_is_ambiguous(repo: Path) -> None:
    first = git.resolve(repo, "HEAD")
    second = _second_commit(repo)
    short = first[:7]
    sh_git(repo, "branch", short, second)  # git itself would silently take the branch
    with pytest.raises(RefusedError) as exc:
        git.resolve(repo, short)
    assert exc.value.code == "ref-ambiguous"
    assert exc.value.details["candidates"] == [
        f"refs/heads/{short}: commit {second}",
        f"object {first}: commit",
    ]
    assert git.resolve(repo, first) == first  # the full SHA names its object, never the branch


def test_ambiguity_is_refused_even_when_git_is_told_not_to_warn(repo: Path) -> None:
    second = _second_commit(repo)
    sh_git(repo, "branch", "v1", second)
    sh_git(repo, "config", "core.warnAmbiguousRefs", "false")
    with pytest.raises(RefusedError) as exc:
        git.resolve(repo, "v1")
    assert exc.value.code == "ref-ambiguous"
    assert len(exc.value.details["candidates"]) == 2


INJECTION_REFS = [
    "--upload-pack=touch /tmp/x",
    "-x",
    "--output=/tmp/x",
    "HEAD;id",
    "../x",
    "main..HEAD",
    "HEAD id",
    "HEAD\n",
    "a\x01b",
    "$(id)",
    "`id`",
    "HEAD:agent.py",
    "@{-1}",
    "",
]


@pytest.mark.parametrize("ref", INJECTION_REFS)
def test_injection_like_refs_are_refused_before_git_runs(tmp_path: Path, ref: str) -> None:
    # The repo does not exist: if git ran, the error would be repo-not-found.
    with pytest.raises(UsageError) as exc:
        git.resolve(tmp_path / "no-such-repo", ref)
    assert exc.value.code == "ref-invalid"


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        git.resolve(tmp_path, "HEAD")
    assert exc.value.code == "repo-not-found"


def test_read_file_and_tree(repo: Path) -> None:
    sha = git.resolve(repo, "HEAD")
    assert git.read_file(repo, sha, "agent.py") == b"print('hello')\n"
    assert git.read_file(repo, sha, "no-such.yaml") is None
    modes = {e.path: (e.mode, e.kind) for e in git.tree(repo, sha)}
    assert modes == {
        "agent.py": ("100644", "blob"),
        "avm.yaml": ("100644", "blob"),
        "run.sh": ("100755", "blob"),
        "latest": ("120000", "symlink"),
        "model/weights.bin": ("100644", "blob"),
    }


# -- bundles -------------------------------------------------------------------------------------


def test_bundle_is_deterministic_and_exact(repo: Path, tmp_path: Path) -> None:
    first = git.resolve(repo, "HEAD")
    a, b = bundle.build(repo, first), bundle.build(repo, first)
    assert a.data == b.data and a.digest == b.digest
    assert a.digest == "sha256:" + hashlib.sha256(a.data).hexdigest()

    # The work tree plays no part: dirty it, the bundle of the commit does not change.
    (repo / "agent.py").write_text("dirty\n")
    assert bundle.build(repo, first).digest == a.digest

    # A fresh clone (which converts line endings on checkout) rebuilds the same bytes.
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "-c", "core.autocrlf=true", "clone", "-q", "--no-hardlinks", str(repo), str(clone)],
        check=True,
        env={**os.environ, **GIT_ENV},
    )
    assert bundle.build(clone, first).data == a.data

    second = commit_all(repo, "second")
    assert bundle.build(repo, second).digest != a.digest


def test_bundle_tar_layout(repo: Path) -> None:
    built = bundle.build(repo, git.resolve(repo, "HEAD"))
    with tarfile.open(fileobj=io.BytesIO(built.data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["agent.py", "avm.yaml", "latest", "model/weights.bin", "run.sh"]
        by_name = {m.name: m for m in members}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members)
        assert all(m.uname == "" and m.gname == "" for m in members)
        assert by_name["agent.py"].mode == 0o644
        assert by_name["run.sh"].mode == 0o755
        assert by_name["latest"].issym() and by_name["latest"].linkname == "model/weights.bin"
    assert set(built.files) == {"agent.py", "avm.yaml", "model/weights.bin", "run.sh"}
    assert built.files["agent.py"] == "sha256:" + hashlib.sha256(b"print('hello')\n").hexdigest()
    assert bundle.unpack_listing(built.data) == built.files


def test_bundle_long_and_unicode_paths_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r"
    path.mkdir()
    sh_git(path, "init", "-q")
    deep = path / ("d" * 80) / ("e" * 80)
    deep.mkdir(parents=True)
    (deep / "file.txt").write_text("x")
    (path / "ünïcødé.txt").write_text("u")
    sha = commit_all(path, "paths")
    built = bundle.build(path, sha)
    assert bundle.unpack_listing(built.data) == built.files
    assert f"{'d' * 80}/{'e' * 80}/file.txt" in built.files and "ünïcødé.txt" in built.files


def test_bundle_refuses_submodules(repo: Path) -> None:
    head = sh_git(repo, "rev-parse", "HEAD")
    sh_git(repo, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor/lib")
    sh_git(repo, "commit", "-q", "-m", "submodule")
    with pytest.raises(RefusedError) as exc:
        bundle.build(repo, git.resolve(repo, "HEAD"))
    assert exc.value.code == "submodule-unsupported"


def test_unpack_listing_refuses_unsafe_members() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(RefusedError) as exc:
        bundle.unpack_listing(buf.getvalue())
    assert exc.value.code == "bundle-invalid"
    with pytest.raises(RefusedError):
        bundle.unpack_listing(b"not a tar" * 100)


# -- cosign format -------------------------------------------------------------------------------


def test_encrypted_key_has_cosigns_format_and_opens_by_the_documented_recipe(
    keypair: tuple[bytes, bytes],
) -> None:
    import nacl.secret
    from cryptography.hazmat.primitives import serialization

    private_pem, public_pem = keypair
    lines = private_pem.decode().splitlines()
    kind = "ENCRYPTED SIGSTORE PRIVATE KEY"  # the PEM type cosign writes
    assert (lines[0], lines[-1]) == (f"-----BEGIN {kind}-----", f"-----END {kind}-----")
    assert all(len(line) <= 64 for line in lines[1:-1])
    body = base64.b64decode("".join(lines[1:-1]))
    doc = json.loads(body)
    # cosign's Go encoder: struct field order, compact separators
    assert list(doc) == ["kdf", "cipher", "ciphertext"]
    assert body.startswith(b'{"kdf":{"name":"scrypt","params":{"N":32768,"r":8,"p":1},"salt":"')
    assert doc["cipher"]["name"] == "nacl/secretbox"
    # Open it independently of controlplane.release.cosign, exactly as the lab opened a real cosign.key.
    key = hashlib.scrypt(
        PASSWORD.encode(),
        salt=base64.b64decode(doc["kdf"]["salt"]),
        n=32768,
        r=8,
        p=1,
        maxmem=64 << 20,
        dklen=32,
    )
    der = nacl.secret.SecretBox(key).decrypt(
        base64.b64decode(doc["ciphertext"]), base64.b64decode(doc["cipher"]["nonce"])
    )
    private = serialization.load_der_private_key(der, password=None)
    assert (
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public_pem
    )
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----\n")


def test_sign_blob_verifies_as_cosign_verify_blob_does(keypair: tuple[bytes, bytes]) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = cosign.load_private_key(keypair[0], PASSWORD.encode())
    data = b"exact bytes\n"
    signature = cosign.sign_blob(private, data)
    pub = serialization.load_pem_public_key(keypair[1])
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(base64.b64decode(signature), data, ec.ECDSA(hashes.SHA256()))  # raises if not
    cosign.verify_blob(keypair[1], data, signature)
    with pytest.raises(RefusedError) as exc:
        cosign.verify_blob(keypair[1], data + b"x", signature)
    assert exc.value.code == "signature-invalid"
    with pytest.raises(RefusedError):
        cosign.verify_blob(keypair[1], data, "not base64!")


def test_older_pem_type_loads_and_wrong_password_is_named(keypair: tuple[bytes, bytes]) -> None:
    older = keypair[0].replace(b"ENCRYPTED SIGSTORE PRIVATE KEY", b"ENCRYPTED COSIGN PRIVATE KEY")
    cosign.load_private_key(older, PASSWORD.encode())
    with pytest.raises(UsageError) as exc:
        cosign.load_private_key(keypair[0], b"wrong")
    assert exc.value.code == "key-password-wrong"
    with pytest.raises(UsageError) as exc:
        cosign.load_private_key(keypair[1], PASSWORD.encode())
    assert exc.value.code == "key-invalid"


def test_key_id_is_sha256_of_spki_der(keypair: tuple[bytes, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization

    der = serialization.load_pem_public_key(keypair[1]).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert cosign.public_key_id(keypair[1]) == "sha256:" + hashlib.sha256(der).hexdigest()


# -- sign and verify releases --------------------------------------------------------------------


def test_sign_verify_round_trip(
    signing_home: Home, repo: Path, tmp_path: Path, keypair: tuple[bytes, bytes]
) -> None:
    key, pub = write_key(tmp_path, keypair)
    trusted = signing.trust_release_key(signing_home, pub)
    signed = signing.sign_release(signing_home, repo, "main", key, PASSWORD.encode())
    assert signed.commit == git.resolve(repo, "main") and signed.keyid == trusted.keyid
    rebuilt = bundle.build(repo, signed.commit)
    assert signing.verify_release(signing_home, rebuilt) == trusted.keyid
    record = json.loads(signed.signature_path.read_text())
    assert record == {
        "commit": signed.commit,
        "bundle_digest": rebuilt.digest,
        "signature": signed.signature,
        "keyid": trusted.keyid,
    }
    # `cosign verify-blob --key cosign.pub --signature <sha>.sig bundle.tar`, done by hand
    cosign.verify_blob(pub.read_bytes(), rebuilt.data, signed.sig_path.read_text())


def test_untrusted_signer_is_refused(
    signing_home: Home,
    repo: Path,
    tmp_path: Path,
    keypair: tuple[bytes, bytes],
    other_keypair: tuple[bytes, bytes],
) -> None:
    key, _pub = write_key(tmp_path, keypair)
    _other_key, other_pub = write_key(tmp_path, other_keypair, "other")
    signed = signing.sign_release(signing_home, repo, "HEAD", key, PASSWORD.encode())
    built = bundle.build(repo, signed.commit)
    with pytest.raises(RefusedError) as exc:  # nothing trusted at all: never "any key"
        signing.verify_release(signing_home, built)
    assert exc.value.code == "signature-untrusted-key"
    other = signing.trust_release_key(signing_home, other_pub, "other")
    with pytest.raises(RefusedError) as exc:
        signing.verify_release(signing_home, built)
    assert exc.value.code == "signature-untrusted-key"
    assert exc.value.details == {"expected": [other.keyid], "actual": signed.keyid}


def test_tampering_is_refused(
    signing_home: Home, repo: Path, tmp_path: Path, keypair: tuple[bytes, bytes]
) -> None:
    key, pub = write_key(tmp_path, keypair)
    signing.trust_release_key(signing_home, pub)
    signed = signing.sign_release(signing_home, repo, "HEAD", key, PASSWORD.encode())
    good = bundle.build(repo, signed.commit)
    data = bytearray(good.data)
    data[512] ^= 1  # one bit of agent.py's content (right after its header)
    tampered = bundle.Bundle(
        sha=good.sha,
        data=bytes(data),
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        files=good.files,
    )
    with pytest.raises(RefusedError) as exc:
        signing.verify_release(signing_home, tampered)
    assert exc.value.code == "bundle-digest-mismatch"
    assert exc.value.details == {"expected": good.digest, "actual": tampered.digest}

    # An attacker who also rewrites the stored digest still cannot forge the signature.
    record = json.loads(signed.signature_path.read_text())
    signed.signature_path.write_text(json.dumps({**record, "bundle_digest": tampered.digest}))
    with pytest.raises(RefusedError) as exc:
        signing.verify_release(signing_home, tampered)
    assert exc.value.code == "signature-invalid"

    # A corrupted signature over the genuine bundle.
    sig = base64.b64decode(record["signature"])
    bad = base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1])).decode()
    signed.signature_path.write_text(json.dumps({**record, "signature": bad}))
    with pytest.raises(RefusedError) as exc:
        signing.verify_release(signing_home, good)
    assert exc.value.code == "signature-invalid"


def test_unsigned_commit_is_refused(signing_home: Home, repo: Path) -> None:
    with pytest.raises(RefusedError) as exc:
        signing.verify_release(signing_home, bundle.build(repo, git.resolve(repo, "HEAD")))
    assert exc.value.code == "signature-missing"


MANIFEST = """\
profiles:
  - name: web
    risk_tier: L1
    entrypoint: [python3, agent.py]
    health: {port: 8081}
artifacts:
  - {path: %s, sha256: "%s"}
"""


@pytest.mark.parametrize(
    ("path", "content", "code"),
    [
        ("model/weights.bin", bytes(range(256)) * 4, None),
        ("model/weights.bin", b"something else", "artifact-digest-mismatch"),
        ("model/missing.bin", bytes(range(256)) * 4, "artifact-missing"),
        ("latest", bytes(range(256)) * 4, "artifact-missing"),  # a symlink is not a pinned file
    ],
)
def test_artifact_pins(repo: Path, path: str, content: bytes, code: str | None) -> None:
    manifest = parse_manifest((MANIFEST % (path, hashlib.sha256(content).hexdigest())).encode())
    built = bundle.build(repo, git.resolve(repo, "HEAD"))
    if code is None:
        signing.verify_artifacts(manifest, built)
        return
    with pytest.raises(RefusedError) as exc:
        signing.verify_artifacts(manifest, built)
    assert exc.value.code == code


def test_trusting_a_different_key_under_an_existing_name_is_refused(
    home: Home, tmp_path: Path, keypair: tuple[bytes, bytes], other_keypair: tuple[bytes, bytes]
) -> None:
    _k, pub = write_key(tmp_path, keypair)
    _o, other = write_key(tmp_path, other_keypair, "other")
    first = signing.trust_release_key(home, pub, "ci")
    assert signing.trust_release_key(home, pub, "ci") == first  # idempotent
    with pytest.raises(RefusedError) as exc:
        signing.trust_release_key(home, other, "ci")
    assert exc.value.code == "key-exists"
    with pytest.raises(UsageError):
        signing.trust_release_key(home, pub, "../evil")


# -- CLI -----------------------------------------------------------------------------------------


def avm(home: Path, *args: str, password: str | None = PASSWORD, cwd: Path | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if k not in ("COSIGN_PASSWORD", "AVM_HOME")}
    if password is not None:
        env["COSIGN_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_cli_release_flow(tmp_path: Path, repo: Path) -> None:
    home = tmp_path / "home"
    keydir = tmp_path / "keys"
    assert avm(home, "keys", "init").returncode == 0

    missing = avm(home, "keys", "release-init", "--out", str(keydir), password=None)
    assert missing.returncode == 64 and "key-password-missing" in missing.stderr
    made = avm(home, "--json", "keys", "release-init", "--out", str(keydir))
    assert made.returncode == 0, made.stderr
    keyid = json.loads(made.stdout)["keyid"]
    assert stat.S_IMODE((keydir / "cosign.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keydir / "cosign.pub").stat().st_mode) == 0o644
    again = avm(home, "keys", "release-init", "--out", str(keydir))
    assert again.returncode == 3 and "key-exists" in again.stderr

    trusted = avm(home, "--json", "keys", "trust", "--release", str(keydir / "cosign.pub"), "--name", "ci")
    assert trusted.returncode == 0, trusted.stderr
    listed = json.loads(avm(home, "--json", "keys", "list").stdout)
    assert listed["release_trusted"] == [
        {"name": "ci", "keyid": keyid, "path": str(home / "keys" / "release-trusted" / "ci.pub")}
    ]
    assert listed["receipt_key"]["keyid"].startswith("sha256:")

    bundle_out = tmp_path / "bundle.tar"
    out = avm(
        home,
        "--json",
        "sign",
        "--repo",
        str(repo),
        "--commit",
        "v1",
        "--key",
        str(keydir / "cosign.key"),
        "--bundle-out",
        str(bundle_out),
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    head = sh_git(repo, "rev-parse", "HEAD")
    assert doc["commit"] == head and doc["keyid"] == keyid
    assert doc["bundle_digest"] == "sha256:" + hashlib.sha256(bundle_out.read_bytes()).hexdigest()
    sig = (home / "signatures" / f"{head}.sig").read_text()
    cosign.verify_blob((keydir / "cosign.pub").read_bytes(), bundle_out.read_bytes(), sig)
    assert signing.verify_release(Home(home), bundle.build(repo, head)) == keyid

    receipts = json.loads(avm(home, "--json", "receipts", "list").stdout)["receipts"]
    assert [r["kind"] for r in receipts][-1] == "sign" and receipts[-1]["status"] == "ok"
    assert avm(home, "receipts", "verify").returncode == 0
    # No secret anywhere under the home: not the password, not the private key.
    private_pem = (keydir / "cosign.key").read_bytes()
    for path in home.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert PASSWORD.encode() not in content, path
            assert private_pem not in content, path

    sign_args = ("sign", "--repo", str(repo), "--key", str(keydir / "cosign.key"))
    wrong = avm(home, *sign_args, "--commit", "HEAD", password="wrong")
    assert wrong.returncode == 64 and "key-password-wrong" in wrong.stderr
    unknown = avm(home, *sign_args, "--commit", "nope")
    assert unknown.returncode == 3 and "ref-unknown" in unknown.stderr


def _last_receipt(home: Path) -> dict[str, Any]:
    listed = json.loads(avm(home, "--json", "receipts", "list", "--last", "1").stdout)["receipts"]
    shown = json.loads(avm(home, "--json", "receipts", "show", str(listed[0]["seq"])).stdout)
    predicate: dict[str, Any] = shown["statement"]["predicate"]
    return predicate


def test_cli_refuses_an_ambiguous_ref_and_lists_the_candidates(
    tmp_path: Path, repo: Path, keypair: tuple[bytes, bytes]
) -> None:
    home = tmp_path / "home"
    assert avm(home, "keys", "init").returncode == 0
    key, _pub = write_key(tmp_path, keypair)
    tag = git.resolve(repo, "refs/tags/v1")
    second = _second_commit(repo)
    sh_git(repo, "branch", "v1", second)
    out = avm(home, "sign", "--repo", str(repo), "--commit", "v1", "--key", str(key))
    assert out.returncode == 3, out.stderr
    assert "error[ref-ambiguous]" in out.stderr
    lines = out.stderr.splitlines()
    assert lines[lines.index("  candidates:") + 1 :][:2] == [
        f"    refs/heads/v1: commit {second}",
        f"    refs/tags/v1: commit {tag}",
    ]
    assert not (home / "signatures").exists()  # nothing signed
    predicate = _last_receipt(home)
    assert predicate["kind"] == "sign" and predicate["status"] == "refused"
    assert predicate["error"]["code"] == "ref-ambiguous"
    exact = avm(home, "--json", "sign", "--repo", str(repo), "--commit", "refs/tags/v1", "--key", str(key))
    assert exact.returncode == 0, exact.stderr
    assert json.loads(exact.stdout)["commit"] == tag


@pytest.mark.parametrize(("length", "rc"), [(26, 0), (27, 64), (32, 64)])
def test_sign_refuses_a_commit_whose_manifest_is_invalid(
    tmp_path: Path, repo: Path, keypair: tuple[bytes, bytes], length: int, rc: int
) -> None:
    """A profile name must fit everything derived from it: `agent-<name>` is a Linux user, at
    most 32 characters, so 26 is the longest name; nothing is signed for a longer one."""
    home = tmp_path / "home"
    assert avm(home, "keys", "init").returncode == 0
    key, _pub = write_key(tmp_path, keypair)
    name = ("p" * length)[: length - 1] + "1"
    (repo / "avm.yaml").write_text(VALID_MANIFEST.replace("name: web", f"name: {name}"))
    sha = commit_all(repo, f"profile name of {length} characters")
    out = avm(home, "--json", "sign", "--repo", str(repo), "--commit", sha, "--key", str(key))
    assert out.returncode == rc, out.stdout + out.stderr
    predicate = _last_receipt(home)
    assert predicate["kind"] == "sign"
    if rc == 0:
        assert json.loads(out.stdout)["commit"] == sha and predicate["status"] == "ok"
        return
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "manifest-invalid"
    assert "profiles.0.name" in error["message"] and "agent-<name> is at most 32" in error["message"]
    assert not (home / "signatures").exists()  # nothing signed
    # a usage refusal is recorded as refused (nothing was changed), not as failed
    assert predicate["status"] == "refused" and predicate["error"]["code"] == "manifest-invalid"


def test_sign_refuses_a_commit_without_a_manifest(
    tmp_path: Path, repo: Path, keypair: tuple[bytes, bytes]
) -> None:
    home = tmp_path / "home"
    assert avm(home, "keys", "init").returncode == 0
    key, _pub = write_key(tmp_path, keypair)
    (repo / "avm.yaml").unlink()
    sha = commit_all(repo, "no manifest")
    out = avm(home, "--json", "sign", "--repo", str(repo), "--commit", sha, "--key", str(key))
    assert out.returncode == 3, out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "manifest-missing"
    assert not (home / "signatures").exists()


@pytest.mark.parametrize("ref", ["--upload-pack=touch {marker}", "HEAD;touch {marker}", "../x", "-x"])
def test_cli_refuses_injection_refs(
    tmp_path: Path, repo: Path, keypair: tuple[bytes, bytes], ref: str
) -> None:
    home = tmp_path / "home"
    assert avm(home, "keys", "init").returncode == 0
    key, _pub = write_key(tmp_path, keypair)
    marker = tmp_path / "pwned"
    out = avm(
        home,
        "--json",
        "sign",
        "--repo",
        str(repo),
        f"--commit={ref.format(marker=marker)}",
        "--key",
        str(key),
    )
    assert out.returncode == 64, out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "ref-invalid"
    assert not marker.exists()
    assert not (home / "signatures").exists()
