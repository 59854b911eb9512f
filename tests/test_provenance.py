"""SLSA Provenance v1 of the real golden image, and `avm image verify` checking an image against it.

The image is the session's real golden image (shared store, never modified here). `avm image
build` (a cache hit) writes the provenance, signed by the home's receipt key and recorded by an
`image-provenance` receipt; securesystemslib and in-toto-attestation check it with only the
public key; `avm image verify` re-hashes every artifact. Tampering is done on copies: an edited
provenance byte, a re-signed but unrecorded provenance, another key, and an image directory of
hard links whose initrd was replaced.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from securesystemslib.dsse import Envelope

from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.evidence import keys, ledger
from controlplane.evidence.receipt import PAYLOAD_TYPE, open_receipt, pae
from controlplane.home import Home
from controlplane.image import provenance
from controlplane.image.golden import GoldenImage
from tests.plugins.golden import shared_image_store
from tests.test_receipts_interop import sslib_key


def avm(home: Home, *args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AVM_IMAGE_CACHE": str(store or shared_image_store())}
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "--home", str(home.root), "--json", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def attested(golden_image: GoldenImage, tmp_path_factory: pytest.TempPathFactory) -> Home:
    home = Home(tmp_path_factory.mktemp("prov") / "avm").ensure()
    keys.init(home)
    out = avm(home, "image", "build")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["image_digest"] == golden_image.digest
    assert Path(doc["provenance"]["path"]) == provenance.provenance_path(home, golden_image.digest)
    return home


def stored(home: Home, image: GoldenImage) -> bytes:
    return provenance.provenance_path(home, image.digest).read_bytes()


def test_the_provenance_is_slsa_v1_with_honest_claims(attested: Home, golden_image: GoldenImage) -> None:
    envelope = Envelope.from_dict(json.loads(stored(attested, golden_image)))
    envelope.verify([sslib_key(keys.public_path(attested).read_bytes())], 1)  # third-party DSSE check
    Statement.copy_from_pb(json_format.Parse(envelope.payload, statement_pb2.Statement())).validate()
    doc = json.loads(envelope.payload)
    m = golden_image.manifest
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in doc["subject"]}
    assert subjects == {
        "manifest.json": golden_image.digest.removeprefix("sha256:"),
        **{a.path: a.sha256.removeprefix("sha256:") for a in m.artifacts.values()},
    }
    build = doc["predicate"]["buildDefinition"]
    assert build["externalParameters"]["recipe"]["digest"]["sha256"] == m.recipe_digest.removeprefix(
        "sha256:"
    )
    sbom = next(d for d in build["resolvedDependencies"] if d.get("name") == "sbom.spdx.json")
    assert sbom["digest"]["sha256"] == m.artifacts["sbom"].sha256.removeprefix("sha256:")
    assert sbom["annotations"]["packages"] == m.packages
    run = doc["predicate"]["runDetails"]
    assert run["builder"]["id"] == provenance.BUILDER_ID
    assert run["builder"]["version"] == {"avm": "0.1.0", **m.tools}
    # no SLSA level is claimed anywhere in what is signed
    assert not re.search(r"level|SLSA_BUILD|L[1-4]\b", envelope.payload.decode(), re.IGNORECASE)


def test_it_is_chained_by_an_image_provenance_receipt(attested: Home, golden_image: GoldenImage) -> None:
    _, _, statement = open_receipt(ledger.read(attested.receipts, ledger.last_seq(attested.receipts)))
    assert statement.predicate.kind == "image-provenance"
    names = {s.name: s.digest["sha256"] for s in statement.subject}
    assert names["provenance"] == sha256_digest(stored(attested, golden_image)).removeprefix("sha256:")
    assert names[f"image:{golden_image.manifest.name}"] == golden_image.digest.removeprefix("sha256:")
    assert avm(attested, "receipts", "verify").returncode == 0


def test_image_verify_re_hashes_every_artifact(attested: Home, golden_image: GoldenImage) -> None:
    out = avm(attested, "image", "verify", "--digest", golden_image.digest)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["artifacts"] == {a.path: a.sha256 for a in golden_image.manifest.artifacts.values()}
    assert report["builder_id"] == provenance.BUILDER_ID


def _refused(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 3, out.stdout + out.stderr
    code: str = json.loads(out.stdout)["error"]["code"]
    return code


def test_an_edited_provenance_is_refused(attested: Home, golden_image: GoldenImage) -> None:
    path = provenance.provenance_path(attested, golden_image.digest)
    original = path.read_bytes()
    envelope = json.loads(original)
    doc = json.loads(base64.b64decode(envelope["payload"]))
    doc["predicate"]["runDetails"]["builder"]["id"] = "https://hosted.example/slsa-l3-builder"
    try:
        envelope["payload"] = base64.b64encode(canonical_bytes(doc)).decode()
        path.write_bytes(canonical_bytes(envelope))
        assert _refused(avm(attested, "image", "verify")) == "provenance-signature-invalid"
        # re-signed with the receipt key, but no receipt names these bytes: not part of the chain
        signer = keys.load_signer(attested)
        payload = canonical_bytes(doc)
        sig = base64.b64encode(signer.sign(pae(PAYLOAD_TYPE, payload))).decode()
        envelope["signatures"] = [{"keyid": signer.keyid, "sig": sig}]
        path.write_bytes(canonical_bytes(envelope))
        assert _refused(avm(attested, "image", "verify")) == "provenance-not-recorded"
    finally:
        path.write_bytes(original)
    assert avm(attested, "image", "verify").returncode == 0


def test_another_key_is_not_trusted(attested: Home, tmp_path: Path) -> None:
    other = Home(tmp_path / "other").ensure()
    keys.init(other)
    out = avm(attested, "image", "verify", "--key", str(keys.public_path(other)))
    assert _refused(out) == "provenance-untrusted-key"


def test_a_replaced_artifact_is_refused(attested: Home, golden_image: GoldenImage, tmp_path: Path) -> None:
    store = tmp_path / "store"
    copy = store / golden_image.directory.name
    copy.mkdir(parents=True)
    for entry in golden_image.directory.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            (copy / entry.name).symlink_to(entry)
        else:
            os.link(entry, copy / entry.name)  # hard links: the shared image is never written
    initrd = copy / golden_image.manifest.artifacts["initrd"].path
    data = bytearray(initrd.read_bytes())
    data[-1] ^= 1
    initrd.unlink()
    initrd.write_bytes(bytes(data))
    out = avm(attested, "image", "verify", store=store)
    assert _refused(out) == "image-artifact-mismatch"
    error: dict[str, Any] = json.loads(out.stdout)["error"]
    assert error["details"]["artifact"] == "initrd"
    assert avm(attested, "image", "verify").returncode == 0  # the shared image is unchanged
