"""The exported JSON Schemas carry every constraint the models enforce, and verify enforces them.

The differential table: each document is judged by the pydantic model and, independently, by
jsonschema over the committed file in receipts/schema/ (Draft 2020-12, format checks on, an
offline registry): both must accept or both must refuse. Then a correctly signed receipt whose
predicate breaks its schema is refused by `avm receipts verify` with receipt-schema-invalid and
the JSON path, and every step kind the code records has its own predicate schema.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from pydantic import BaseModel, ValidationError
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

from controlplane.canonical import canonical_bytes
from controlplane.errors import RefusedError
from controlplane.evidence import keys, ledger, verify
from controlplane.evidence import schema as receiptschema
from controlplane.evidence import step as evidence
from controlplane.evidence.receipt import PAYLOAD_TYPE, Predicate, Statement, open_receipt, pae
from controlplane.home import Home
from controlplane.image.golden import ImageManifest
from controlplane.image.recipe import Recipe
from controlplane.jobs.spec import JobSpec
from controlplane.promote import plan
from controlplane.release.manifest import ReleaseManifest

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "receipts" / "schema"
HEX = "ab" * 32


def _no_fetch(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


def committed_validator(stem: str) -> Draft202012Validator:
    """A validator an auditor would build from the committed files alone."""
    docs = [json.loads(p.read_text()) for p in SCHEMA_DIR.glob("*.schema.json")]
    registry: Registry[Any] = Registry(retrieve=_no_fetch).with_resources(  # type: ignore[call-arg]
        (d["$id"], Resource.from_contents(d)) for d in docs
    )
    schema = json.loads((SCHEMA_DIR / f"{stem}.schema.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=registry, format_checker=FormatChecker())


PREDICATE: dict[str, Any] = {
    "kind": "vm-up",
    "seq": 2,
    "prev": HEX,
    "status": "ok",
    "started": "2026-01-01T00:00:00.000Z",
    "finished": "2026-01-01T00:00:01.000Z",
    "duration_s": 1.0,
    "control_host": "ci",
}
STATEMENT: dict[str, Any] = {
    "_type": "https://in-toto.io/Statement/v1",
    "subject": [{"name": "image:golden", "digest": {"sha256": HEX}}],
    "predicateType": "https://agent-vm.dev/receipt/vm-up/v1",
    "predicate": PREDICATE,
}
JOB: dict[str, Any] = {"id": "job-1", "image": f"golden@sha256:{HEX}", "command": ["true"]}
RECIPE: dict[str, Any] = {"packages": ["systemd", "openssh-server"]}
RELEASE: dict[str, Any] = {
    "profiles": [{"name": "web", "risk_tier": "L1", "entrypoint": ["a"], "health": {"port": 8081}}]
}
IMAGE: dict[str, Any] = {
    "name": "golden",
    "recipe_digest": f"sha256:{HEX}",
    "suite": "bookworm",
    "architecture": "amd64",
    "kernel_version": "6.1",
    "cmdline": "console=ttyS0",
    "built_at": "2026-01-01T00:00:00Z",
    "packages": 10,
    "artifacts": {"disk": {"path": "disk.raw", "sha256": f"sha256:{HEX}", "size": 1}},
    "rootfs": {"files": 1, "bytes": 1},
}


def edit(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


# (case, model, schema stem, document, accepted)
TABLE: list[tuple[str, type[BaseModel], str, dict[str, Any], bool]] = [
    ("statement-valid", Statement, "receipt", STATEMENT, True),
    ("statement-first-receipt", Statement, "receipt", edit(STATEMENT, "predicate.prev", None), True),
    ("prev-not-hex", Statement, "receipt", edit(STATEMENT, "predicate.prev", "not-hex"), False),
    ("prev-uppercase", Statement, "receipt", edit(STATEMENT, "predicate.prev", HEX.upper()), False),
    ("prev-trailing-newline", Statement, "receipt", edit(STATEMENT, "predicate.prev", HEX + "\n"), False),
    ("kind-not-kebab", Statement, "receipt", edit(STATEMENT, "predicate.kind", "VM_UP"), False),
    ("status-unknown", Statement, "receipt", edit(STATEMENT, "predicate.status", "maybe"), False),
    ("seq-zero", Statement, "receipt", edit(STATEMENT, "predicate.seq", 0), False),
    ("started-not-utc", Statement, "receipt", edit(STATEMENT, "predicate.started", "yesterday"), False),
    ("no-subject", Statement, "receipt", edit(STATEMENT, "subject", []), False),
    ("extra-key", Statement, "receipt", edit(STATEMENT, "predicate.extra", 1), False),
    ("predicate-valid", Predicate, "receipt-predicate", PREDICATE, True),
    ("predicate-of-its-kind", Predicate, "receipt-predicate-vm-up", PREDICATE, True),
    ("job-valid", JobSpec, "jobspec", JOB, True),
    ("job-id-bad", JobSpec, "jobspec", edit(JOB, "id", "-bad-"), False),
    ("job-image-tag", JobSpec, "jobspec", edit(JOB, "image", "golden:latest"), False),
    ("job-image-digest-not-hex", JobSpec, "jobspec", edit(JOB, "image", "golden@sha256:not-hex"), False),
    ("job-env-lowercase", JobSpec, "jobspec", edit(JOB, "env", {"path": "x"}), False),
    ("job-env-ok", JobSpec, "jobspec", edit(JOB, "env", {"PATH": "x"}), True),
    ("job-output-dotdot", JobSpec, "jobspec", edit(JOB, "outputs", ["a/../../etc"]), False),
    ("job-output-absolute", JobSpec, "jobspec", edit(JOB, "outputs", ["/etc/passwd"]), False),
    ("job-output-dot", JobSpec, "jobspec", edit(JOB, "outputs", ["."]), False),
    ("job-output-nested", JobSpec, "jobspec", edit(JOB, "outputs", ["out/result.json", "..x"]), True),
    ("job-command-nul", JobSpec, "jobspec", edit(JOB, "command", ["a\x00b"]), False),
    ("job-env-value-nul", JobSpec, "jobspec", edit(JOB, "env", {"PATH": "a\x00"}), False),
    ("job-output-nul", JobSpec, "jobspec", edit(JOB, "outputs", ["a\x00"]), False),
    ("job-vcpus-too-many", JobSpec, "jobspec", edit(JOB, "vcpus", 9), False),
    ("recipe-valid", Recipe, "recipe", RECIPE, True),
    ("recipe-package-bad", Recipe, "recipe", edit(RECIPE, "packages", ["-rf"]), False),
    ("recipe-packages-duplicate", Recipe, "recipe", edit(RECIPE, "packages", ["a1", "a1"]), False),
    (
        "recipe-shell-other",
        Recipe,
        "recipe",
        edit(RECIPE, "users", [{"name": "x", "shell": "/bin/zsh"}]),
        False,
    ),
    (
        "recipe-shell-known",
        Recipe,
        "recipe",
        edit(RECIPE, "users", [{"name": "x", "shell": "/bin/sh"}]),
        True,
    ),
    ("recipe-cmdline-double-space", Recipe, "recipe", edit(RECIPE, "boot", {"cmdline": "a  b"}), False),
    ("recipe-cmdline-ok", Recipe, "recipe", edit(RECIPE, "boot", {"cmdline": "console=ttyS0 rw"}), True),
    ("recipe-glob-relative", Recipe, "recipe", edit(RECIPE, "trim", {"dpkg_path_exclude": ["usr/x"]}), False),
    (
        "recipe-glob-dotdot",
        Recipe,
        "recipe",
        edit(RECIPE, "trim", {"dpkg_path_exclude": ["/usr/../x"]}),
        False,
    ),
    (
        "recipe-glob-ok",
        Recipe,
        "recipe",
        edit(RECIPE, "trim", {"dpkg_path_exclude": ["/usr/share/doc/*"]}),
        True,
    ),
    (
        "recipe-module-absolute",
        Recipe,
        "recipe",
        edit(RECIPE, "trim", {"kernel_modules_keep": ["/x.ko"]}),
        False,
    ),
    ("recipe-mirror-query", Recipe, "recipe", edit(RECIPE, "mirror", "http://x/?a=b"), False),
    ("release-valid", ReleaseManifest, "manifest", RELEASE, True),
    (
        "release-profile-too-long",
        ReleaseManifest,
        "manifest",
        edit(RELEASE, "profiles.0.name", "a" * 27),
        False,
    ),
    (
        "release-artifact-not-hex",
        ReleaseManifest,
        "manifest",
        edit(RELEASE, "artifacts", [{"path": "a", "sha256": "not-hex"}]),
        False,
    ),
    (
        "release-artifact-dotdot",
        ReleaseManifest,
        "manifest",
        edit(RELEASE, "artifacts", [{"path": "../a", "sha256": HEX}]),
        False,
    ),
    (
        "release-secret-ref-bad",
        ReleaseManifest,
        "manifest",
        edit(RELEASE, "profiles.0.secrets", {"K": "vault:x"}),
        False,
    ),
    ("image-valid", ImageManifest, "image-manifest", IMAGE, True),
    (
        "image-digest-not-hex",
        ImageManifest,
        "image-manifest",
        edit(IMAGE, "recipe_digest", "sha256:not-hex"),
        False,
    ),
    (
        "image-artifact-digest-bare",
        ImageManifest,
        "image-manifest",
        edit(IMAGE, "artifacts", {"d": {"path": "d", "sha256": HEX, "size": 1}}),
        False,
    ),
]


@pytest.mark.parametrize(("case", "model", "stem", "doc", "accepted"), TABLE, ids=[t[0] for t in TABLE])
def test_pydantic_and_jsonschema_agree(
    case: str, model: type[BaseModel], stem: str, doc: dict[str, Any], accepted: bool
) -> None:
    try:
        model.model_validate_json(json.dumps(doc))
        by_pydantic = True
    except ValidationError:
        by_pydantic = False
    errors = list(committed_validator(stem).iter_errors(doc))
    assert by_pydantic is accepted, case
    assert (not errors) is accepted, [e.message for e in errors]


def test_a_remote_ref_is_never_fetched() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "https://example.invalid/x.json",
    }
    registry: Registry[Any] = Registry(retrieve=_no_fetch)  # type: ignore[call-arg]
    from referencing.exceptions import Unresolvable

    with pytest.raises(Unresolvable):
        Draft202012Validator(schema, registry=registry).validate({})
    # avm's own validators hold only avm's schemas: every $id is a urn:agent-vm one
    ids = {v.schema["$id"] for v in receiptschema._validators().values() if isinstance(v.schema, dict)}
    assert all(i.startswith("urn:agent-vm:schema:") for i in ids)
    assert len(ids) == len(receiptschema.KINDS) + 2


def _resign(home: Home, seq: int, change: dict[str, Any]) -> None:
    """Replace receipt ``seq`` by a correctly signed one whose predicate has ``change``."""
    _, payload, _ = open_receipt(ledger.read(home.receipts, seq))
    doc = json.loads(payload)
    doc["predicate"].update(change)
    new_payload = canonical_bytes(doc)
    signer = keys.load_signer(home)
    sig = signer.sign(pae(PAYLOAD_TYPE, new_payload))
    envelope = {
        "payload": base64.b64encode(new_payload).decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": signer.keyid, "sig": base64.b64encode(sig).decode()}],
    }
    ledger.receipt_path(home.receipts, seq).write_bytes(canonical_bytes(envelope))


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"prev": "not-hex"}, "$.predicate.prev"),
        ({"status": "maybe"}, "$.predicate.status"),
        ({"finished": "soon"}, "$.predicate.finished"),
    ],
    ids=["prev-not-hex", "status-unknown", "finished-not-a-time"],
)
def test_verify_refuses_a_signed_receipt_that_breaks_its_schema(
    home: Home, change: dict[str, Any], path: str
) -> None:
    keys.init(home)
    for i in range(3):
        with evidence.record_step(home, "status", inputs={"i": i}) as step:
            step.subject(f"thing-{i}", "sha256:" + HEX)
    _resign(home, 3, change)
    before = {p.name: p.read_bytes() for p in home.receipts.iterdir()}
    with pytest.raises(RefusedError) as info:
        verify.verify(keys.load_trusted([keys.public_path(home)]), directory=home.receipts)
    assert info.value.code == "receipt-schema-invalid"
    assert info.value.details["path"] == path
    assert info.value.details["schema"] == "urn:agent-vm:schema:receipt:v1"
    out = subprocess.run(
        [sys.executable, "-m", "controlplane", "--home", str(home.root), "--json", "receipts", "verify"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 3, out.stderr
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "receipt-schema-invalid"
    assert err["details"]["path"] == path
    assert {p.name: p.read_bytes() for p in home.receipts.iterdir()} == before


def test_a_predicate_is_checked_against_its_own_kind(home: Home) -> None:
    doc = copy.deepcopy(PREDICATE)
    receiptschema.check("r", "receipt-predicate-vm-up", doc)
    with pytest.raises(RefusedError) as info:
        receiptschema.check("r", "receipt-predicate-vm-down", doc)
    assert info.value.code == "receipt-schema-invalid"
    assert info.value.details["path"] == "$.kind"


def test_every_recorded_kind_has_a_predicate_schema() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "controlplane").rglob("*.py"))
    found = set(re.findall(r'record_step\(\s*\w+(?:\.home)?,\s*"([a-z0-9-]+)"', source))
    found |= set(re.findall(r'kind(?::\s*str)?\s*=\s*"([a-z][a-z0-9-]+)"', source))
    # plan actions and drift.py's file-type letter share the keyword but are not step kinds
    found -= {*typing.get_args(plan.ActionKind), "l"}
    assert found, "the scan found no kinds: the pattern is stale"
    missing = found - set(receiptschema.KINDS)
    assert not missing, f"add {sorted(missing)} to receiptschema.KINDS and run `make schemas`"
    for kind in receiptschema.KINDS:
        assert (SCHEMA_DIR / f"receipt-predicate-{kind}.schema.json").is_file()
