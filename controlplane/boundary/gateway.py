"""One egress gateway: its files, its Envoy, and updates that are proven in force or refused.

``Gateway(root)`` owns ``root/`` (0700): ``xds/`` (bootstrap, LDS, CDS, SDS documents), the
admin socket, the access log and Envoy's own log. ``start(spec)`` renders, validates, writes and
starts Envoy, then waits until the admin interface reports the rendering's generation.
``apply(spec)`` is the hot reload: render, validate, write each file beside its target and
rename it over (SDS, then the ``stages``: CDS with old and new clusters, LDS, the final CDS; the
Tier-1 reload in ``promote.egressapply`` runs the same stages over SSH), polling
the admin interface after each step until Envoy reports the new version; if Envoy rejects a
step, the last good files are put back and the error (``gateway-reload-rejected``) names both generations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

from controlplane._internal.fs import write_atomic
from controlplane.boundary import envoy
from controlplane.boundary.admin import Admin, InForce
from controlplane.boundary.render import GatewaySpec, Rendered, documents, dump, render
from controlplane.errors import OperationalError


def reload_rejected(in_force: str, refused: str, why: str) -> OperationalError:
    """Envoy refused an update; the last good generation is still the one serving. The error's
    ``details`` carry both generations (``in_force``, ``refused``) and ``why``."""
    return OperationalError(
        "gateway-reload-rejected",
        f"the gateway refused generation {refused} ({why}); generation {in_force} stays in force",
        hint="the gateway's log (envoy.log beside its config) says which resource it refused",
        details={"in_force": in_force, "refused": refused, "why": why},
    )


@dataclasses.dataclass(frozen=True)
class Reload:
    before: str
    after: str
    seconds: float  # from the first file renamed to the new generation reported in force


class Stage(NamedTuple):
    """One file of a hot reload: renamed over ``file``, in force once Envoy reports ``version``
    for ``kind`` (``lds``: the policy generation; ``cds``: the cluster version)."""

    file: str
    doc: dict[str, Any]
    kind: Literal["lds", "cds"]
    version: str


def stages(old_clusters: list[dict[str, Any]], old_cds_version: str, new: Rendered) -> list[Stage]:
    """The order of a hot reload from the clusters in force to ``new``, for both tiers.

    Clusters first, as the union of old and new (the new listeners route to the new clusters
    while the old listeners still route to the old), then the listeners, then the final
    clusters (dropping the old ones). A reload that only adds clusters needs no final step;
    one that keeps the clusters touches only the listeners.
    """
    if new.cds_version == old_cds_version:
        return [Stage("lds.json", new.lds, "lds", new.generation)]
    union = {r["name"]: r for r in old_clusters + new.cds["resources"]}
    if len(union) == len(new.cds["resources"]):
        return [
            Stage("cds.json", new.cds, "cds", new.cds_version),
            Stage("lds.json", new.lds, "lds", new.generation),
        ]
    staged = {"version_info": "staged|" + new.cds_version, "resources": list(union.values())}
    return [
        Stage("cds.json", staged, "cds", str(staged["version_info"])),
        Stage("lds.json", new.lds, "lds", new.generation),
        Stage("cds.json", new.cds, "cds", new.cds_version),
    ]


class Gateway:
    """A context manager: leaving it stops Envoy. ``netns``: run Envoy inside that namespace."""

    def __init__(self, root: Path, *, netns: str | None = None, concurrency: int = 2) -> None:
        self.root, self.netns = root, netns
        self.xds_dir, self.admin_socket = root / "xds", root / "admin.sock"
        self.access_log, self.envoy_log = root / "access.log", root / "envoy.log"
        self.admin = Admin(self.admin_socket)
        self.process = envoy.EnvoyProcess(
            self.xds_dir / "bootstrap.json", self.envoy_log, netns=netns, concurrency=concurrency
        )
        self.rendered: Rendered | None = None

    def paths(self) -> dict[str, Path]:
        """The ``GatewaySpec`` fields this gateway decides: ``GatewaySpec(**gw.paths(), ...)``."""
        return {"xds_dir": self.xds_dir, "admin_socket": self.admin_socket, "access_log": self.access_log}

    def put_secret(self, ref: str, value: bytes) -> Path:
        """Write a credential's value where Envoy reads it (0600, renamed over: a rotation takes
        effect on the next request, no restart). Returns the path for ``GatewaySpec.secrets``."""
        path = self.root / "secrets" / ref.rsplit("/", 1)[1]
        write_atomic(path, value, 0o600)
        return path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write(self, name: str, doc: dict[str, Any]) -> None:
        write_atomic(self.xds_dir / name, dump(doc), 0o600)  # beside, then renamed over

    def start(self, spec: GatewaySpec, timeout: float = 30.0) -> InForce:
        """Render, validate, write and start; return what the admin reports once in force.
        Raises ``gateway-config-invalid`` (nothing written) or ``gateway-start-failed``."""
        rendered = render(spec)
        envoy.validate(rendered)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for name, doc in documents(rendered).items():
            self._write(name, doc)
        self.rendered = rendered
        return self.launch(timeout)

    def launch(self, timeout: float = 15.0) -> InForce:
        """Start Envoy on the files as they are (a restart after a crash or a stop)."""
        assert self.rendered is not None, "start() first"
        self.admin_socket.unlink(missing_ok=True)
        self.process.start()
        want = self.rendered
        if not envoy.wait_until(lambda: not self.process.running() or self._serving(want), timeout):
            seen = self.admin.in_force() if self.admin.ready() else "not ready"
            self.process.stop()
            raise OperationalError(
                "gateway-start-failed",
                f"the gateway did not serve generation {want.generation} within {timeout:g}s "
                f"(admin reports {seen}): {self.process.log_tail()}",
            )
        if not self.process.running():
            raise OperationalError(
                "gateway-start-failed",
                f"Envoy exited {self.process.stop()}: {self.process.log_tail()}",
            )
        return self.admin.in_force()

    def _serving(self, want: Rendered) -> bool:
        if not self.admin.ready():
            return False
        got = self.admin.in_force()
        return (got.lds, got.cds, got.listeners) == (want.generation, want.cds_version, _expected(want))

    def in_force(self) -> InForce:
        return self.admin.in_force()

    def apply(self, spec: GatewaySpec, timeout: float = 10.0) -> Reload:
        """Hot reload to ``spec`` (no restart; open connections are kept). Raises
        ``gateway-config-invalid`` (nothing written) or ``gateway-reload-rejected`` (the last
        good files restored and in force again)."""
        old = self.rendered
        assert old is not None, "start() first"
        new = render(spec)
        if not _subset(new, old):  # a pure removal is made of parts Envoy already validated and runs
            envoy.validate(new)
        if new.generation == old.generation:
            return Reload(old.generation, new.generation, 0.0)
        start = time.monotonic()
        for name, doc in new.sds.items():
            self._write(f"sds/{name}", doc)
        try:
            for stage in stages(old.cds["resources"], old.cds_version, new):
                self._step(stage, old, new, timeout)
                if stage.kind == "lds" and not envoy.wait_until(
                    lambda: self.admin.listeners() == _expected(new), timeout
                ):
                    raise reload_rejected(
                        old.generation, new.generation, "listeners not active within the deadline"
                    )
        except OperationalError as exc:
            if exc.code != "gateway-reload-rejected":
                raise
            self._restore(old, timeout)
            raise
        self.rendered = new
        for stale in set(old.sds) - set(new.sds):
            (self.xds_dir / "sds" / stale).unlink(missing_ok=True)
        return Reload(old.generation, new.generation, time.monotonic() - start)

    def _step(self, stage: Stage, old: Rendered, new: Rendered, timeout: float) -> None:
        """Write one xDS file and poll the admin stats until Envoy reports the stage's version
        or counts a rejected update."""
        which = 0 if stage.kind == "lds" else 1
        rejected = self.admin.versions()[2]
        self._write(stage.file, stage.doc)
        state: list[tuple[str, str, int]] = []

        def settled() -> bool:
            state[:] = [self.admin.versions()]
            return state[0][which] == stage.version or state[0][2] > rejected

        if not envoy.wait_until(settled, timeout, 0.002):
            raise reload_rejected(
                old.generation, new.generation, f"{stage.file} not in force within {timeout:g}s"
            )
        if state[0][2] > rejected:
            raise reload_rejected(old.generation, new.generation, f"Envoy rejected {stage.file}")

    def _restore(self, old: Rendered, timeout: float) -> None:
        self._write("lds.json", old.lds)
        self._write("cds.json", old.cds)
        want = (old.generation, old.cds_version)
        envoy.wait_until(lambda: self.admin.versions()[:2] == want, timeout)

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()


def _subset(new: Rendered, old: Rendered) -> bool:
    """Every listener, cluster and secret of ``new`` is, byte for byte, one of ``old``'s."""

    def key(doc: dict[str, Any]) -> str:
        return json.dumps(doc, sort_keys=True)

    pairs = ((new.lds, old.lds), (new.cds, old.cds))
    same = all({key(r) for r in n["resources"]} <= {key(r) for r in o["resources"]} for n, o in pairs)
    return same and all(old.sds.get(name) == doc for name, doc in new.sds.items())


def _expected(rendered: Rendered) -> dict[str, str]:
    return {
        str(r["name"]): str(r["metadata"]["filter_metadata"]["avm"]["policy"])
        for r in rendered.lds["resources"]
    }
