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
from typing import Any

import pytest

from controlplane.evidence import keys
from controlplane.home import Home
from controlplane.image import sign as imagesign
from controlplane.jobs.oci import store as ocistore
from controlplane.release import cosign
from controlplane.release import trust as signing
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
    from controlplane.jobs import kernel as guestkernel

    return guestkernel.cached(Path("/var/tmp/avm-guest-kernel")) is not None


GETROOT_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
/* A hostile job: become root through the set-uid bit, then forge a result on every port. */
int main(void) {
    int r = setuid(0);
    printf("getroot: setuid(0)=%d uid=%d euid=%d\n", r, (int)getuid(), (int)geteuid());
    int s = open("/.avm/secret", O_RDONLY);
    printf("getroot: secret %s\n", s >= 0 ? "READ" : strerror(errno));
    const char *forged = "AVM-RESULT-1 forged\nrc\n0\nAVM-RESULT-END forged\n";
    char path[64];
    for (int i = 0; i < 8; i++) {
        for (int j = 0; j < 8; j++) {
            snprintf(path, sizeof path, "/dev/vport%dp%d", i, j);
            int fd = open(path, O_WRONLY);
            if (fd >= 0 && write(fd, forged, strlen(forged)) > 0) printf("WROTE %s\n", path);
            else if (errno != ENOENT) printf("getroot: %s: %s\n", path, strerror(errno));
            if (fd >= 0) close(fd);
        }
    }
    printf("avm-init: job exit 0\n");
    fflush(stdout);
    return 7;
}
"""


def setuid_image(home: Home, base: Path, key: bytes) -> str:
    """A signed image, built by hand as an OCI layout, holding a static set-uid-root ``/bin/getroot``
    (compiled now) next to busybox. Imported with ``avm``'s importer and signed with ``key``."""
    import gzip
    import hashlib
    import io
    import subprocess
    import tarfile

    base.mkdir(parents=True, exist_ok=True)
    src, binary = base / "getroot.c", base / "getroot"
    src.write_text(GETROOT_C)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(src)], check=True, timeout=120)
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in (("bin/busybox", busybox.read_bytes(), 0o755),
                                 ("bin/getroot", binary.read_bytes(), 0o4755)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bin/sh")
        info.type, info.linkname = tarfile.SYMTYPE, "busybox"
        tar.addfile(info)
    layer = gzip.compress(buf.getvalue(), mtime=0)
    layout = base / "setuid-layout"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return f"sha256:{hexd}"

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()  # fmt: skip
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": ocistore.MANIFEST_TYPE,
        "config": {"mediaType": ocistore.CONFIG_TYPE, "digest": blob(config), "size": len(config)},
        "layers": [{"mediaType": ocistore.LAYER_GZ, "digest": blob(layer), "size": len(layer)}],
    }).encode()  # fmt: skip
    digest = blob(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "manifests": [{"mediaType": ocistore.MANIFEST_TYPE, "digest": digest,
             "size": len(manifest), "annotations": {ocistore.REF_NAME: "avm/setuid"}}]}  # fmt: skip
    (layout / "index.json").write_text(json.dumps(index))
    (image,) = ocistore.import_layout(home, layout)
    imagesign.sign_image(home, image.name, image.digest, key, PASSWORD)
    return image.ref


def home_pids(home: Home, run_id: str = "") -> list[int]:
    """QEMU processes of this home's job runs (their command line names the home's work dir)."""
    from controlplane.vm.procs import pids_with_marker

    return pids_with_marker(f"{home.run / 'jobs'}/avmjob+{run_id}")


LIBS = ("libssl.so.3", "libcrypto.so.3", "libc.so.6", "libnss_files.so.2")


def tls_image(env: JobEnv) -> str:
    """The test image plus /usr/bin/openssl (a verifying TLS client) and the libraries it links,
    signed with the test key."""
    lib = Path("/lib/x86_64-linux-gnu")
    files = {
        "usr/bin/openssl": Path("/usr/bin/openssl"),
        "lib64/ld-linux-x86-64.so.2": Path("/lib64/ld-linux-x86-64.so.2"),
    }
    files |= {f"lib/x86_64-linux-gnu/{name}": lib / name for name in LIBS}
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    image = ocistore.build_job_image(env.home, "avm/test-tls", files, busybox=busybox)
    imagesign.sign_image(env.home, image.name, image.digest, env.key.read_bytes(), PASSWORD)
    return image.ref


def run_through_gateway(
    env: JobEnv,
    spec_path: Path,
    tmp_path: Path,
    world_ns: str,
    upstreams: dict[str, tuple[str, int]],
    ca: Path,
) -> tuple[Any, Any]:
    """Run the job at ``spec_path`` with the host gateway (root ``tmp_path/gw``) in ``world_ns``,
    next to the test upstreams (pinned resolutions, verified against ``ca``); its outputs go to
    ``tmp_path/out``. Returns the parsed spec and the job's result."""
    from controlplane.boundary.hostgw import HostGatewayOptions
    from controlplane.jobs.runner import run_job
    from controlplane.jobs.spec import load_jobspec

    gateway = HostGatewayOptions(root=tmp_path / "gw", netns=world_ns, upstreams=upstreams, trusted_ca=ca)
    spec = load_jobspec(spec_path)
    result = run_job(
        env.home, spec, spec_dir=spec_path.parent, output_dir=tmp_path / "out",
        network_options={"uplink_netns": world_ns, "gateway": gateway},
    )  # fmt: skip
    return spec, result
