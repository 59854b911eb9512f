"""Render a verified release into the exact bytes a promotion writes: ``Material``. Pure.

From ``avm.yaml`` at the commit: per profile an env file (non-secret values only), a
fail-closed tool policy, and a unit drop-in (entrypoint, limits, IP allowlist, credentials by
reference). Secret values never pass through here: the drop-in names credential files only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING

from controlplane.canonical import canonical_bytes
from controlplane.errors import OperationalError
from controlplane.promote.layout import LAYOUT, UNIT_TEMPLATE_NAME
from controlplane.promote.material import HealthCheck, Material, ProfileMaterial, ReleaseMaterial
from controlplane.release.manifest import Profile, ReleaseManifest

if TYPE_CHECKING:
    from controlplane.boundary.tier1 import Tier1Gateway

# package data; ``units/agent-gateway@.service`` at the top of the source tree is a symlink to it
UNIT_FILE: Traversable = files("controlplane").joinpath("data", UNIT_TEMPLATE_NAME)
CREDENTIALS = LAYOUT.credentials


def unit_template() -> bytes:
    """The shipped ``units/agent-gateway@.service``."""
    try:
        return UNIT_FILE.read_bytes()
    except OSError as exc:
        raise OperationalError("unit-template-missing", f"cannot read {UNIT_FILE}: {exc.strerror}") from exc


def _systemd_quote(arg: str) -> str:
    """Quote one ExecStart argument; ``%`` and ``$`` are escaped so they stay literal."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def env_file(profile: Profile) -> bytes:
    lines = [f"# written by avm for profile {profile.name}; secrets are credentials, never here"]
    for key, value in sorted(profile.env.items()):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
        lines.append(f'{key}="{escaped}"')
    return ("\n".join(lines) + "\n").encode()


POLICY_VERSION = 1


def policy_file(profile: Profile) -> bytes:
    """The runtime tool policy: anything not listed is denied (fail closed).

    Each allowed MCP tool carries the sha256 of its canonical descriptor; the gateway's guard
    (examples/hello-agent/mcp_guard.py) serves a tool only when its name is listed and its
    schema hashes to exactly that value, and refuses to serve at all if this file is invalid.
    """
    allow = [{"name": t.name, "schema_sha256": t.schema_sha256} for t in profile.tools]
    egress: dict[str, object] = {"default": "deny", "allow": [r.model_dump() for r in profile.egress]}
    if profile.egress_names.names:  # by name, through the gateway (credential refs, never values)
        egress["names"] = profile.egress_names.model_dump(mode="json")["names"]
    return canonical_bytes(
        {
            "version": POLICY_VERSION,
            "profile": profile.name,
            "risk_tier": profile.risk_tier,
            "tools": {"default": "deny", "allow": sorted(allow, key=lambda t: t["name"])},
            "egress": egress,
        }
    )


def dropin(profile: Profile, gateway: Tier1Gateway | None = None) -> bytes:
    """The unit drop-in. With a gateway, the boundary's lines too (``tier1.dropin_lines``).
    Credentials the gateway injects are in ``egress:`` entries, not ``secrets:``: they never
    become a LoadCredential= (``credentials-at-boundary`` refuses a profile that lists both)."""
    lines = [
        f"# written by avm for profile {profile.name}",
        "[Service]",
        "ExecStart=",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in profile.entrypoint),
        f"MemoryMax={profile.limits.memory_max}",
        f"TasksMax={profile.limits.tasks_max}",
        f"CPUQuota={profile.limits.cpu_quota}",
    ]
    hosts = sorted({rule.host for rule in profile.egress})
    if hosts:
        lines.append("IPAddressAllow=" + " ".join(hosts))
    for name in sorted(profile.secrets):
        lines.append(f"LoadCredential={name}:{CREDENTIALS}/{profile.name}/{name}")
    if gateway is not None:
        from controlplane.boundary.tier1 import dropin_lines

        lines += dropin_lines(gateway, profile.name)
    return ("\n".join(lines) + "\n").encode()


def material(
    manifest: ReleaseManifest,
    release: ReleaseMaterial,
    *,
    profiles: Sequence[str] = (),
    others: Iterable[ReleaseMaterial] = (),
    gateway: Tier1Gateway | None = None,
) -> Material:
    """Material for promoting ``release`` to ``profiles`` (all declared ones if empty), with the
    host's egress gateway when a profile lists names (``promote.gateway.prepare``)."""
    chosen = [manifest.profile(p) for p in profiles] if profiles else list(manifest.profiles)
    rendered = tuple(
        ProfileMaterial(
            name=p.name,
            release=release.sha,
            env=env_file(p),
            policy=policy_file(p),
            dropin=dropin(p, gateway),
            health=HealthCheck(port=p.health.port, path=p.health.path, timeout_s=p.health.timeout_s),
            canary=p.canary,
            soak_s=manifest.soak_s,
            secret_refs=tuple(sorted(p.secrets.items())),
            egress=tuple((r.host, r.port, r.proto) for r in p.egress),
        )
        for p in chosen
    )
    releases = {release.sha: release, **{r.sha: r for r in others}}
    return Material(unit=unit_template(), releases=releases, profiles=rendered, gateway=gateway)


def describe(material_: Material) -> dict[str, object]:
    """A JSON-safe summary for plans and receipts (digests, never secret values)."""
    return json.loads(canonical_bytes(material_.desired().model_dump(mode="json")))  # type: ignore[no-any-return]
