"""The content classifier on a Tier-1 host: ``avm-classifier.service``, installed next to the gateway.

When a listed name is ``inspect: true``, ``ensure`` writes the reference classifier's stdlib
sources (``boundary.classifyd.SOURCES``) under ``/usr/local/lib/avm-classifier`` and its unit,
(re)starts it when they changed, and waits for its socket: the gateway's ext_authz filter asks
it before Envoy takes a request for such a name. When no name inspects, the unit is stopped and
its files removed, so nothing listens that no policy needs. The unit runs as its own user
(``avm-classifier``) without network; ``avm-gateway`` reaches its socket through the group.
"""

from __future__ import annotations

import time
from importlib.resources import files
from typing import TYPE_CHECKING

from controlplane.boundary import classifyd, tier1
from controlplane.errors import OperationalError
from controlplane.promote.gateway import Blob, put_file
from controlplane.promote.layout import LAYOUT

if TYPE_CHECKING:
    from controlplane.evidence.step import Step
    from controlplane.transport.base import Transport

UNIT_FILE = files("controlplane").joinpath("data", tier1.CLASSIFIER_UNIT)
SOCKET_WAIT_S = 15.0


def blobs() -> list[Blob]:
    """The classifier's sources and its unit (all root-owned, world-readable: no secret)."""
    out: list[Blob] = [
        (str(tier1.CLASSIFIER_LIB / rel), data, 0o644, "root") for rel, data in classifyd.sources().items()
    ]
    out.append((f"{LAYOUT.unit_dir}/{tier1.CLASSIFIER_UNIT}", UNIT_FILE.read_bytes(), 0o644, "root"))
    return out


def ensure(host: Transport, gw: tier1.Tier1Gateway, step: Step) -> None:
    """Install and run the classifier when ``gw`` inspects a name, else stop and remove it.

    Raises ``OperationalError('classifier-not-running')`` when its socket does not appear."""
    if not gw.inspects:
        remove(host, step)
        return
    from controlplane.canonical import sha256_digest
    from controlplane.promote.gateway import _changed

    want = blobs()
    changed = _changed(host, {path: sha256_digest(data) for path, data, _, _ in want})
    for path, data, mode, group in want:
        put_file(host, path, data, mode, group)
    step.command(host.run(["systemctl", "daemon-reload"], timeout=60).check())
    step.command(host.run(["systemctl", "enable", "--no-reload", tier1.CLASSIFIER_UNIT], timeout=60).check())
    active = host.run(["systemctl", "is-active", "--quiet", tier1.CLASSIFIER_UNIT], timeout=30).ok
    verb = "restart" if changed or not active else "start"
    step.command(host.run(["systemctl", verb, tier1.CLASSIFIER_UNIT], timeout=60).check())
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not (up := host.run(["test", "-S", str(tier1.CLASSIFIER_SOCKET)], timeout=30).ok):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    step.observe(
        "classifier",
        {
            "unit": tier1.CLASSIFIER_UNIT,
            "socket": str(tier1.CLASSIFIER_SOCKET),
            "files": {path: sha256_digest(data) for path, data, _, _ in want},
            "restarted": verb == "restart",
        },
    )
    step.check(
        "classifier-running", ok=up, detail=f"{tier1.CLASSIFIER_SOCKET} {'listening' if up else 'absent'}"
    )
    if not up:
        tail = host.run(["journalctl", "-u", tier1.CLASSIFIER_UNIT, "-n", "20", "--no-pager"], timeout=30)
        raise OperationalError(
            "classifier-not-running",
            f"{tier1.CLASSIFIER_UNIT} did not open {tier1.CLASSIFIER_SOCKET} within {SOCKET_WAIT_S:.0f} s",
            hint=f"the unit's journal: {tail.stdout[-800:]}",
        )


def remove(host: Transport, step: Step) -> None:
    """Stop and remove the classifier (nothing when it was never installed)."""
    unit = f"{LAYOUT.unit_dir}/{tier1.CLASSIFIER_UNIT}"
    if not host.run(["test", "-e", unit], timeout=30).ok:
        return
    step.command(host.run(["systemctl", "disable", "--now", tier1.CLASSIFIER_UNIT], timeout=60))
    step.command(host.run(["rm", "-rf", "--", str(tier1.CLASSIFIER_LIB), unit], timeout=60).check())
    step.command(host.run(["systemctl", "daemon-reload"], timeout=60).check())
