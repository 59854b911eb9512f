"""Tier-2 job fixtures: an avm home with a trusted cosign key and a signed busybox job image.

Keys are generated at test time. The guest kernel is the golden image's (session fixture); the
minimal kernel is used where a test says so and it is built (``minimal_kernel``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from controlplane import cosign, imagesign, keys, ocistore, signing
from controlplane.home import Home
from tests.plugins.require import require_root, require_tools

PASSWORD = b"test-password"
SCRIPTS = {
    "hello.sh": (
        '#!/bin/sh\necho hello-from-job\necho "greeting=$GREETING"\ncat /job/in/data.txt\n'
        'echo err-line >&2\nmkdir -p "$AVM_OUT/sub"\necho result-file > "$AVM_OUT/sub/r.txt"\n'
    ),
    "forge.sh": (
        "#!/bin/sh\necho 'avm-init: job exit 0'\n"
        'for p in /dev/vport*; do echo 0 > "$p" && echo WROTE-$p; done\n'
        "kill -9 1 && echo KILLED-INIT\nexit 5\n"
    ),
    "escape.sh": '#!/bin/sh\nln -s /etc "$AVM_OUT/x"\n',
}


@dataclasses.dataclass(frozen=True)
class JobEnv:
    home: Home
    image: str  # NAME@sha256:... of the signed test image
    key: Path
    pub: Path
    workdir: Path

    def spec(self, name: str, **fields: object) -> Path:
        # L1: the tier whose controls a signed, pinned test image meets without an approval
        doc = {"image": self.image, "timeout": 60, "risk_tier": "L1", **fields}
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(doc))
        return path


def needs_job_tools() -> None:
    require_root("Tier-2 jobs: golden image kernel, namespaces")
    require_tools("qemu-system-x86_64", "busybox")


@pytest.fixture(scope="module")
def jobenv(tmp_path_factory: pytest.TempPathFactory, golden_image: object) -> JobEnv:
    from tests.plugins.golden import shared_image_store

    needs_job_tools()
    os.environ.setdefault("AVM_IMAGE_CACHE", str(shared_image_store()))
    base = tmp_path_factory.mktemp("jobs")
    home = Home(base / "avm").ensure()
    keys.init(home)
    return prepare(home, base)


def prepare(home: Home, base: Path) -> JobEnv:
    """A trusted cosign key (made now) and a signed busybox job image in ``home``."""
    private, public = cosign.generate_keypair(PASSWORD)
    (base / "cosign.key").write_bytes(private)
    (base / "cosign.pub").write_bytes(public)
    signing.trust_release_key(home, base / "cosign.pub", "jobs")
    files = {}
    for name, text in SCRIPTS.items():
        (base / name).write_text(text)
        files[name] = base / name
    (base / "data.txt").write_text("input-data\n")
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    image = ocistore.build_job_image(home, "avm/test-job", files, busybox=busybox)
    imagesign.sign_image(home, image.name, image.digest, private, PASSWORD)
    return JobEnv(home=home, image=image.ref, key=base / "cosign.key", pub=base / "cosign.pub", workdir=base)


def minimal_kernel_available() -> bool:
    from controlplane import guestkernel

    return guestkernel.cached(Path("/var/tmp/avm-guest-kernel")) is not None
