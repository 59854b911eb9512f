"""``avm image build --verify-reproducible``: rebuild an image from its record, compare bit for bit.

The record is what the manifest keeps: the recipe (``recipe.json``), the package set
(``name:arch=version`` of every installed package), the source date and the wheel programs'
sha256. ``verify_reproducible`` rebuilds into a scratch store inside the image store (apt pinned
to the recorded versions), compares the two images and removes the scratch store (and any left
by a killed verify: one verify per store runs at a time, under ``.verify.lock``). When the
bytes differ, the report says which artifact, which file of the rootfs and why
(``imagerepro.compare_trees``); when the rootfs trees agree but the ext4 image does not, it names
the superblock fields that differ and the first differing byte.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from controlplane._internal import tools as imagetools
from controlplane._internal.progress import Progress
from controlplane.errors import OperationalError, RefusedError
from controlplane.image import repro as imagerepro
from controlplane.image import store as imagestore
from controlplane.image.golden import GoldenImage
from controlplane.image.recipe import Recipe

MAX_LISTED = 50


def verify_reproducible(image: GoldenImage, store: Path, progress: Progress) -> dict[str, Any]:
    """Rebuild ``image`` from its record and compare. Returns the report (``reproducible`` true).

    Raises ``OperationalError('image-record-missing')`` for an image built before the package
    set was recorded, and ``RefusedError('image-not-reproducible')`` (the report in ``details``)
    when the rebuild differs.
    """
    from controlplane.image.build import build_image

    pins = image.manifest.package_set
    if not pins:
        raise OperationalError(
            "image-record-missing",
            f"image {image.digest} records no package set, so it cannot be rebuilt from its record",
            hint="rebuild it with `avm image build --force` (this build records the package set)",
        )
    recipe = Recipe.model_validate_json(image.artifact("recipe").read_bytes())
    started = time.monotonic()
    # one verify per store at a time, so a scratch store left by a killed one can be removed
    with imagestore.exclusive(store / ".verify.lock", progress):
        for stale in sorted(store.glob(".verify-*")):
            progress(f"image verify: removing {stale.name}, left by a verify that was killed")
            imagestore.remove_tree(stale)
        scratch = Path(tempfile.mkdtemp(prefix=".verify-", dir=store))
        try:
            progress(f"image verify: rebuilding {image.digest} from its record into {scratch}")
            rebuilt = build_image(recipe, scratch, pins=pins, progress=progress).image
            report = compare_images(image, rebuilt)
        finally:
            imagestore.remove_tree(scratch)
    report["rebuild_s"] = round(time.monotonic() - started, 1)
    if not report["reproducible"]:
        differences = report["differences"]
        first = differences[0] if differences else {"path": "manifest.json", "cause": "see artifacts"}
        raise RefusedError(
            "image-not-reproducible",
            f"the rebuild of {image.digest} from its record is {report['second']}: "
            f"{len(differences)} difference(s), first {first['path']} ({first['cause']})",
            hint="the details list each file and its cause; fix the build step that writes it",
            details=report,
        )
    return report


def compare_images(a: GoldenImage, b: GoldenImage) -> dict[str, Any]:
    """Compare two built images: artifacts, package sets, rootfs files, and the ext4 image."""
    arts = {
        name: {"first": art.sha256, "second": b.manifest.artifacts[name].sha256}
        for name, art in sorted(a.manifest.artifacts.items())
        if name in b.manifest.artifacts and art.sha256 != b.manifest.artifacts[name].sha256
    }
    differences: list[dict[str, Any]] = [
        {"path": f"manifest.json:{key}", "fields": ["value"], "cause": cause}
        for key, cause in _manifest_field_changes(a, b)
    ]
    if a.digest != b.digest:
        tree = imagerepro.compare_trees(imagerepro.snapshot(a.rootfs), imagerepro.snapshot(b.rootfs))
        differences.extend(tree)
        if "raw" in arts and not tree:
            differences.extend(_ext4_differences(a.raw, b.raw, a.manifest.source_date_epoch or 0))
        if "qcow2" in arts and "raw" not in arts:
            differences.append(
                {"path": "golden.qcow2", "fields": ["bytes"], "cause": "qemu-img convert wrote other bytes"}
            )
    return {
        "reproducible": a.digest == b.digest,
        "first": a.digest,
        "second": b.digest,
        "artifacts_differing": arts,
        "differences_total": len(differences),
        "differences": differences[:MAX_LISTED],
        "package_set_changes": _package_changes(a.manifest.package_set, b.manifest.package_set)[:MAX_LISTED],
    }


def _manifest_field_changes(a: GoldenImage, b: GoldenImage) -> list[tuple[str, str]]:
    left, right = a.manifest.model_dump(mode="json"), b.manifest.model_dump(mode="json")
    out = []
    for key in sorted(set(left) - {"artifacts"}):
        if left.get(key) != right.get(key):
            cause = {
                "package_set": "the mirror no longer serves a recorded version (see package_set_changes)",
                "tools": "the build tools (mmdebstrap, mkfs.ext4, qemu-img) are other versions",
                "binaries": "another build of a wheel program is installed",
            }.get(key, "a recorded build input differs")
            out.append((key, cause))
    return out


def _package_changes(first: tuple[str, ...], second: tuple[str, ...]) -> list[str]:
    one = dict(p.split("=", 1) for p in first)
    two = dict(p.split("=", 1) for p in second)
    return [
        f"{name}: {one.get(name, '(absent)')} -> {two.get(name, '(absent)')}"
        for name in sorted(set(one) | set(two))
        if one.get(name) != two.get(name)
    ]


def _ext4_differences(first: Path, second: Path, epoch: int) -> list[dict[str, Any]]:
    """The rootfs trees agree: name the superblock lines that differ, else the first byte."""
    heads = [imagetools.dumpe2fs_header(p, epoch).stdout.splitlines() for p in (first, second)]
    lines = sorted(set(heads[0]) ^ set(heads[1]))
    fields = sorted({line.split(":", 1)[0].strip() for line in lines})
    if fields:
        return [{"path": "golden.raw", "fields": fields, "cause": "ext4 superblock fields differ"}]
    offset = _first_difference(first, second)
    return [
        {
            "path": "golden.raw",
            "fields": [f"byte {offset}"],
            "cause": "ext4 metadata differs although every file, time and owner agree (block allocation)",
        }
    ]


def _first_difference(first: Path, second: Path) -> int:
    chunk = 1 << 20
    offset = 0
    with first.open("rb") as fa, second.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return offset + next(
                    i for i in range(min(len(x), len(y)) + 1) if x[i : i + 1] != y[i : i + 1]
                )
            if not x:
                return -1
            offset += len(x)
