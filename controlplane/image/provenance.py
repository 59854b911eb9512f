"""SLSA Provenance v1 for golden images, and checking an image against it. Offline.

``attest`` writes, for one built image, an in-toto Statement v1 with predicate type
``https://slsa.dev/provenance/v1`` in a DSSE envelope signed by the home's receipt key (same
key, same PAE, same canonical JSON as receipts), stored as ``<home>/provenance/<digest>.intoto.json``.
It is chained like any receipt: an ``image-provenance`` receipt names the envelope's sha256, so
replacing the file later breaks the link the receipt chain holds.

What it says: the subjects are ``manifest.json`` (the image digest) and every artifact by
sha256; ``buildDefinition`` carries the recipe digest and the recipe file's digest, the build
format, the Debian suite, architecture and mirrors, and the SBOM's digest (the package set) as
resolved dependencies; ``runDetails`` names the builder honestly (``avm image build`` on this
control host, not a hosted build platform), the tool versions and the build time. It claims no
SLSA build level: the build runs on the operator's machine and the provenance is signed with a
key that machine holds, which is not what SLSA Build L2+ requires.

``verify`` checks an image against its provenance: a trusted key and a valid signature, the
predicate type, the manifest digest, and every artifact's bytes re-hashed.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import socket
from pathlib import Path
from typing import Any, Final

from controlplane import __version__
from controlplane._internal.fs import write_atomic
from controlplane.canonical import canonical_bytes, sha256_digest
from controlplane.errors import OperationalError, RefusedError
from controlplane.evidence import keys
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import PAYLOAD_TYPE, STATEMENT_TYPE, pae
from controlplane.home import Home
from controlplane.image.golden import MANIFEST, GoldenImage

SLSA_PROVENANCE: Final = "https://slsa.dev/provenance/v1"
BUILD_TYPE: Final = "https://agent-vm.dev/golden-image/build/v1"
BUILDER_ID: Final = "https://agent-vm.dev/builders/avm-image-build/operator-host"
CHUNK = 1 << 20


def provenance_path(home: Home, image_digest: str) -> Path:
    return home.root / "provenance" / f"{image_digest.removeprefix('sha256:')}.intoto.json"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def statement(image: GoldenImage, build_receipt: str | None) -> dict[str, Any]:
    """The SLSA Provenance v1 statement of ``image`` (from its manifest and recipe file)."""
    from controlplane.image.recipe import BUILD_FORMAT

    m = image.manifest
    recipe = json.loads(image.artifact("recipe").read_bytes())
    subjects = [{"name": "manifest.json", "digest": {"sha256": image.digest.removeprefix("sha256:")}}]
    subjects += [
        {"name": a.path, "digest": {"sha256": a.sha256.removeprefix("sha256:")}}
        for _, a in sorted(m.artifacts.items())
    ]
    mirrors = [u for u in (recipe.get("mirror"), recipe.get("security_mirror")) if u]
    deps: list[dict[str, Any]] = [
        {
            "name": "sbom.spdx.json",
            "digest": {"sha256": m.artifacts["sbom"].sha256.removeprefix("sha256:")},
            "annotations": {"packages": m.packages, "what": "the installed Debian package set (SPDX)"},
        },
        *({"uri": uri, "annotations": {"what": "Debian mirror the packages came from"}} for uri in mirrors),
    ]
    # built_at is the source date (reproducible builds); the build finished when its manifest was published
    published = datetime.datetime.fromtimestamp((image.directory / MANIFEST).stat().st_mtime, datetime.UTC)
    metadata = {"finishedOn": published.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if build_receipt:
        metadata["invocationId"] = f"urn:agent-vm:receipt:{build_receipt}"
    predicate = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "recipe": {"name": m.name, "digest": {"sha256": m.recipe_digest.removeprefix("sha256:")}},
                "recipeFile": {"digest": {"sha256": m.artifacts["recipe"].sha256.removeprefix("sha256:")}},
            },
            "internalParameters": {
                "buildFormat": BUILD_FORMAT,
                "suite": m.suite,
                "architecture": m.architecture,
                "kernelVersion": m.kernel_version,
            },
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID, "version": {"avm": __version__, **dict(sorted(m.tools.items()))}},
            "metadata": metadata,
        },
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": SLSA_PROVENANCE,
        "predicate": predicate,
    }


def attest(home: Home, image: GoldenImage, build_receipt: str | None) -> tuple[Path, str, str | None]:
    """Sign and store the provenance of ``image``, recorded by an ``image-provenance`` receipt.
    Returns (path, envelope digest, receipt id)."""
    signer = keys.load_signer(home)
    payload = canonical_bytes(statement(image, build_receipt))
    envelope = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [
            {"keyid": signer.keyid, "sig": base64.b64encode(signer.sign(pae(PAYLOAD_TYPE, payload))).decode()}
        ],
    }
    data = canonical_bytes(envelope)
    path = provenance_path(home, image.digest)
    inputs = {"image": image.digest, "build_receipt": build_receipt}
    with evidence.record_step(home, "image-provenance", inputs=inputs) as step:
        step.subject(f"image:{image.manifest.name}", image.digest)
        step.subject("provenance", sha256_digest(data))
        write_atomic(path, data, mode=0o644)
        step.observe("path", str(path))
        step.observe("control_host", socket.gethostname())
        step.result.update(
            {"predicate_type": SLSA_PROVENANCE, "builder_id": BUILDER_ID, "keyid": signer.keyid}
        )
        step.non_claim("no SLSA build level is claimed: the build ran on this host, signed by its own key")
    return path, sha256_digest(data), step.receipt_id


def _refuse(code: str, message: str, **details: Any) -> RefusedError:
    return RefusedError(
        code,
        message,
        hint="do not boot this image; rebuild it with `avm image build --force`",
        details=details,
    )


def _recorded(home: Home, digest: str) -> bool:
    """An ok ``image-provenance`` receipt in the chain names exactly these envelope bytes."""
    from controlplane.evidence import reader as auditlog

    for _, st in auditlog.statements(home.receipts, newest_first=True):
        names = {f"{s.name}={s.digest.get('sha256', '')}" for s in st.subject}
        ok = st.predicate.kind == "image-provenance" and st.predicate.status == "ok"
        if ok and f"provenance={digest.removeprefix('sha256:')}" in names:
            return True
    return False


def verify(home: Home, image: GoldenImage, trusted: keys.TrustedKeys) -> dict[str, Any]:
    """Check ``image`` against its stored provenance. Raises ``RefusedError`` (exit 3)."""
    path = provenance_path(home, image.digest)
    try:
        stored = path.read_bytes()
    except FileNotFoundError:
        raise _refuse(
            "provenance-missing",
            f"no provenance for image {image.digest} at {path}",
            hint="avm image build writes it (a cached image too)",
        ) from None
    except OSError as exc:
        raise OperationalError("provenance-unreadable", f"cannot read {path}: {exc}") from exc
    try:
        envelope = json.loads(stored)
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = envelope["signatures"][0]
        keyid, sig = signature["keyid"], base64.b64decode(signature["sig"], validate=True)
        doc = json.loads(payload)
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error) as exc:
        raise _refuse("provenance-malformed", f"{path} is not a DSSE envelope: {exc}") from exc
    if keyid not in trusted.keys:
        raise _refuse(
            "provenance-untrusted-key",
            "the provenance is signed by a key that is not trusted",
            expected=sorted(trusted.keys),
            actual=keyid,
        )
    if envelope.get("payloadType") != PAYLOAD_TYPE or not trusted.verify(
        keyid, sig, pae(PAYLOAD_TYPE, payload)
    ):
        raise _refuse("provenance-signature-invalid", "the provenance signature does not match its bytes")
    if doc.get("predicateType") != SLSA_PROVENANCE or doc.get("_type") != STATEMENT_TYPE:
        raise _refuse(
            "provenance-malformed",
            "not an in-toto SLSA Provenance v1 statement",
            actual=doc.get("predicateType"),
        )
    subjects = {s["name"]: "sha256:" + s["digest"]["sha256"] for s in doc.get("subject", [])}
    if subjects.get("manifest.json") != image.digest:
        raise _refuse(
            "provenance-subject-mismatch",
            "the provenance is for another image manifest",
            expected=image.digest,
            actual=subjects.get("manifest.json"),
        )
    if not _recorded(home, sha256_digest(stored)):
        raise _refuse(
            "provenance-not-recorded",
            "no image-provenance receipt names this provenance file",
            actual=sha256_digest(stored),
        )
    checked = {}
    for name, artifact in sorted(image.manifest.artifacts.items()):
        want = subjects.get(artifact.path)
        have = _hash_file(image.directory / artifact.path)
        if want != have:
            raise _refuse(
                "image-artifact-mismatch",
                f"{artifact.path} is not the file the provenance names",
                artifact=name,
                expected=want,
                actual=have,
            )
        checked[artifact.path] = have
    return {
        "image": image.digest,
        "provenance": sha256_digest(stored),
        "keyid": keyid,
        "builder_id": doc["predicate"]["runDetails"]["builder"]["id"],
        "artifacts": checked,
    }
