"""JSON Schemas of the documents avm reads and writes, exported to ``receipts/schema/``.

Auditors and CI systems validate receipts, manifests and job specs against these files without
installing avm. ``python -m controlplane.schemas receipts/schema`` rewrites them; a test fails when
the committed files differ from what the models export.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from controlplane.evidence.schema import receipt_schemas, schema_id

# file stem -> "module:Model"
SCHEMAS = {
    "jobspec": "controlplane.jobs.spec:JobSpec",
    "recipe": "controlplane.image.recipe:Recipe",
    "image-manifest": "controlplane.image.golden:ImageManifest",
    "receipt-envelope": "controlplane.evidence.receipt:Envelope",
    "image-signature": "controlplane.image.sign:SignatureRecord",
    "manifest": "controlplane.release.manifest:ReleaseManifest",
    "tier": "controlplane.governance.tiers:TierTable",
}


def finish(stem: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A model's schema as a standalone Draft 2020-12 document with its stable ``$id``."""
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id(stem)}


def export_all() -> dict[str, bytes]:
    schemas: dict[str, dict[str, Any]] = {}
    for stem, ref in SCHEMAS.items():
        module_name, _, attr = ref.partition(":")
        model: Any = getattr(importlib.import_module(module_name), attr)
        schemas[stem] = model.model_json_schema()
    # the statement and one schema per receipt kind's predicate (what `avm receipts verify` checks)
    schemas.update(receipt_schemas())
    return {
        f"{stem}.schema.json": (json.dumps(finish(stem, schema), indent=2, sort_keys=True) + "\n").encode()
        for stem, schema in sorted(schemas.items())
    }


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in export_all().items():
        path = directory / name
        path.write_bytes(data)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "receipts/schema")):
        print(p)
