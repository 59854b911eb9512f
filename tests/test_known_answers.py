"""Known answers for every byte string avm signs or digests.

A release signature is over the bundle bytes, a job image signature over the manifest digest,
a receipt signature over DSSE PAE of the canonical statement. Stored signatures stay valid only
while the same input gives the same bytes, so each is pinned here from fixed input: a format
change (a tar header, a JSON separator, a key order, a gzip level) fails one of these tests
instead of silently invalidating every signature made before it. If a change is deliberate, it
needs a new format version and a migration, not a new constant here.

A job image is verified from its stored blobs, never rebuilt, so its pin guards rebuilds: the same
files must give the same digest on any machine and Python version. (Job-image layers were
written by ``tarfile`` until they moved to the bundle's own tar writer, ``_internal.archive``;
that one deliberate change is why these three constants changed once. Stored images and their
signatures were not affected.)

The gzip'd job image layer depends on zlib's deflate output too: the uncompressed layer digest
(the config's diff_id) is pinned separately so a zlib change is told apart from a tar change.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

from controlplane.canonical import canonical_bytes
from controlplane.evidence import keys
from controlplane.evidence.receipt import PAYLOAD_TYPE, Statement, open_receipt, pae, seal
from controlplane.home import Home
from controlplane.image import sign as imagesign
from controlplane.jobs.oci import store as ocistore
from controlplane.release import bundle, git

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Known Answer",
    "GIT_AUTHOR_EMAIL": "kat@example.com",
    "GIT_COMMITTER_NAME": "Known Answer",
    "GIT_COMMITTER_EMAIL": "kat@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
LONG = "deep/" + "d" * 60 + "/" + "f" * 60 + ".txt"  # over 100 bytes: a PAX path record
TREE: dict[str, bytes] = {
    "avm.yaml": b"profiles:\n  - name: web\n",
    "run.sh": b"#!/bin/sh\necho run\n",  # committed 100755
    "données/é.txt": b"non-ASCII path\n",  # a PAX path record
    LONG: b"long path\n",
    "empty": b"",
}

# the pinned answers
COMMIT = "73c2c7d305902f66dd1dbba75c27e94ade148319"
BUNDLE_DIGEST = "sha256:3c14ce4b5b8a688f19d44538d4d5adeed546c8eb7ab7e742faa5e3d8e9ebce5c"
BUNDLE_SIZE = 8192
IMAGE_DIGEST = "sha256:7c780176cf6dcc088d5e37c8b4e0465355ee6717916d30020ea54d73ca4028cd"
IMAGE_DIFF_ID = "sha256:188632fde78fe1c57534e6286df60549f4ee77983592898bc75f9c8f50775531"
IMAGE_CONFIG_DIGEST = "sha256:4dd5c62c87c4ddff62e2affc07228c9917fc8bdacef7d6103cbe44e7597c6d6e"
IMAGE_SIGNING_PAYLOAD = (
    b'{"critical":{"identity":{"docker-reference":"avm/known-answer"},'
    b'"image":{"docker-manifest-digest":"sha256:7c780176cf6dcc088d5e37c8b4e0465355ee6717916d30020ea54d73ca4028cd"},'
    b'"type":"cosign container image signature"},"optional":null}'
)
STATEMENT = (  # RFC 8785: keys sorted, no whitespace, 2.0 written as 2, UTF-8 as is
    b'{"_type":"https://in-toto.io/Statement/v1","predicate":{"checks":[{"detail":"","name":"health",'
    b'"ok":true}],"commands":[{"argv":["systemctl","restart","x"],"duration_s":0.25,"rc":0}],'
    b'"control_host":"ci-1","duration_s":1.5,"error":null,"events":[],"finished":"2024-01-01T00:00:01.5Z",'
    b'"inputs":{"ref":"v1.0.0","\xc3\xa9":[1,2,null,true]},"kind":"promote","non_claims":[],'
    b'"observations":{},"prev":"cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd","result":'
    b'{"a":{"nested":"value"},"z":1},"seq":7,"started":"2024-01-01T00:00:00Z","status":"ok"},'
    b'"predicateType":"https://agent-vm.dev/receipt/promote/v1","subject":[{"digest":{"sha256":'
    b'"abababababababababababababababababababababababababababababababab"},"name":"release"}]}'
)
PAE_SHA256 = "fafe11681f4a9cfa1c6fa1752017127ad37480862dc332033290d8776b34b894"


def _fixed_repo(path: Path) -> str:
    path.mkdir()
    env = {**os.environ, **GIT_ENV}

    def sh(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=path, env=env, capture_output=True, check=True, timeout=30)
        return out.stdout.decode().strip()

    sh("init", "-q", "-b", "main")
    for rel, data in TREE.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    (path / "run.sh").chmod(0o755)
    (path / "latest").symlink_to("avm.yaml")
    sh("add", "-A")
    sh("commit", "-q", "-m", "known answer")
    return sh("rev-parse", "HEAD")


def test_a_fixed_tree_gives_a_fixed_bundle(tmp_path: Path) -> None:
    sha = _fixed_repo(tmp_path / "repo")
    assert sha == COMMIT  # fixed content, author, committer and dates: a fixed commit
    built = bundle.build(tmp_path / "repo", git.resolve(tmp_path / "repo", "HEAD"))
    assert (built.digest, len(built.data)) == (BUNDLE_DIGEST, BUNDLE_SIZE)
    assert built.digest == "sha256:" + hashlib.sha256(built.data).hexdigest()
    assert built.files == {rel: "sha256:" + hashlib.sha256(data).hexdigest() for rel, data in TREE.items()}
    assert built.symlinks == {"latest": "avm.yaml"}
    assert built.executables == frozenset({"run.sh"})


def test_a_fixed_job_image_gives_a_fixed_digest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "job.sh").write_bytes(b"#!/bin/sh\necho known-answer\n")
    (src / "job.sh").chmod(0o755)
    (src / "data.txt").write_bytes(b"input\n")
    (src / "data.txt").chmod(0o644)
    home = Home(tmp_path / "avm").ensure()
    files = {"job/job.sh": src / "job.sh", "job/in/data.txt": src / "data.txt"}
    image = ocistore.build_job_image(home, "avm/known-answer", files, cmd=["/job/job.sh"])
    assert image.manifest["config"]["digest"] == IMAGE_CONFIG_DIGEST
    config = json.loads(ocistore.read_blob(ocistore.store_dir(home), IMAGE_CONFIG_DIGEST))
    assert config["rootfs"]["diff_ids"] == [IMAGE_DIFF_ID]  # the uncompressed layer tar
    assert image.digest == IMAGE_DIGEST  # the manifest bytes, which name the gzip'd layer
    # the same inputs in another store give the same image; another Cmd is another image
    same = ocistore.build_job_image(
        Home(tmp_path / "b").ensure(), "avm/known-answer", files, cmd=["/job/job.sh"]
    )
    assert same.digest == IMAGE_DIGEST
    assert (
        ocistore.build_job_image(Home(tmp_path / "c").ensure(), "avm/known-answer", files).digest
        != IMAGE_DIGEST
    )
    # what `avm image sign` signs for it (cosign's simple-signing payload)
    assert imagesign.payload("avm/known-answer", IMAGE_DIGEST) == IMAGE_SIGNING_PAYLOAD


def _statement() -> Statement:
    return Statement.model_validate(
        {
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"name": "release", "digest": {"sha256": "ab" * 32}}],
            "predicateType": "https://agent-vm.dev/receipt/promote/v1",
            "predicate": {
                "kind": "promote",
                "seq": 7,
                "prev": "cd" * 32,
                "status": "ok",
                "started": "2024-01-01T00:00:00Z",
                "finished": "2024-01-01T00:00:01.5Z",
                "duration_s": 1.5,
                "control_host": "ci-1",
                "inputs": {"ref": "v1.0.0", "é": [1, 2.0, None, True]},
                "commands": [{"argv": ["systemctl", "restart", "x"], "rc": 0, "duration_s": 0.25}],
                "checks": [{"name": "health", "ok": True}],
                "result": {"z": 1, "a": {"nested": "value"}},
            },
        }
    )


def test_a_fixed_receipt_statement_gives_fixed_payload_and_pae_bytes(tmp_path: Path) -> None:
    payload = canonical_bytes(_statement().model_dump(mode="json", by_alias=True))
    assert payload == STATEMENT
    signed = pae(PAYLOAD_TYPE, payload)
    assert signed == b"DSSEv1 28 application/vnd.in-toto+json 726 " + STATEMENT
    assert hashlib.sha256(signed).hexdigest() == PAE_SHA256
    # seal() signs exactly these bytes and stores exactly this payload (key made now)
    home = Home(tmp_path / "avm").ensure()
    keys.init(home)
    signer = keys.load_signer(home)
    envelope, stored_payload, _ = open_receipt(seal(_statement(), signer))
    assert stored_payload == payload
    trusted = keys.load_own_trusted(home)
    assert trusted.verify(envelope.signatures[0].keyid, base64.b64decode(envelope.signatures[0].sig), signed)
