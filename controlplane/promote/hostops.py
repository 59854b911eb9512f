"""Mutating operations on a Tier-1 host, each one argv (or one put) through the transport.

Small stdlib programs (``controlplane/hostscripts/``) run with the host's ``python3 -c`` where
an operation must be atomic or verified on the host itself (release unpacking, the ``current``
flip, health checks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from controlplane import hostscripts
from controlplane.errors import OperationalError
from controlplane.promote.layout import LAYOUT
from controlplane.promote.material import HealthCheck, ReleaseMaterial
from controlplane.transport.base import RunResult, Transport

# The host-side programs (stdlib Python, package data in controlplane/hostscripts/): the unpack
# verifies every file against the signed list before the release appears; health means the
# service reports the expected commit, not that a symlink points at it.
_UNPACK = hostscripts.text("unpack_release")
_FLIP = hostscripts.text("flip_link")
_HEALTH = hostscripts.text("health_probe")


def create_release(host: Transport, rel: ReleaseMaterial) -> RunResult:
    host.run(["mkdir", "-p", LAYOUT.incoming], timeout=30).check()
    tar_path = LAYOUT.incoming_tar(rel.sha)
    host.put(rel.bundle, tar_path, mode=0o600)
    result = host.run(
        [
            "python3",
            "-c",
            _UNPACK,
            tar_path,
            LAYOUT.release_dir(rel.sha),
            json.dumps(rel.files, sort_keys=True),
        ],
        timeout=300,
    )
    return result.check(hint="the release directory was not created; nothing else changed")


def install_unit(host: Transport, unit: bytes) -> None:
    host.put(unit, LAYOUT.unit_template, mode=0o644)


def ensure_user(host: Transport, profile: str) -> RunResult:
    user = LAYOUT.user(profile)
    if host.run(["id", "-u", user], timeout=30).ok:
        return host.run(["id", user], timeout=30)
    return host.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            user,
        ],
        timeout=60,
    ).check()


def profile_file(kind: str, profile: str) -> tuple[str, int]:
    """Path and mode of a per-profile file, by the plan action that writes it."""
    return {
        "write-env": (LAYOUT.env_file(profile), 0o600),
        "write-policy": (LAYOUT.policy_file(profile), 0o644),
        "write-dropin": (LAYOUT.dropin(profile), 0o644),
    }[kind]


def write_profile_file(host: Transport, kind: str, profile: str, data: bytes) -> str:
    path, mode = profile_file(kind, profile)
    host.run(["mkdir", "-p", path.rsplit("/", 1)[0]], timeout=30).check()
    host.put(data, path, mode=mode)
    return path


def write_credentials(host: Transport, profile: str, values: Mapping[str, bytes]) -> list[str]:
    """Write secret values as systemd credential files (root-only, 0600). Returns the paths."""
    host.run(["mkdir", "-p", "-m", "0700", LAYOUT.credentials_dir(profile)], timeout=30).check()
    paths = []
    for name, value in sorted(values.items()):
        path = LAYOUT.credential(profile, name)
        host.put(value, path, mode=0o600)
        paths.append(path)
    return paths


def remove_user(host: Transport, profile: str) -> RunResult:
    """Remove a profile user that a failed apply created (its unit is stopped by then)."""
    return host.run(["userdel", LAYOUT.user(profile)], timeout=60)


def flip(host: Transport, profile: str, target: str) -> RunResult:
    return host.run(["python3", "-c", _FLIP, target, LAYOUT.current_link(profile)], timeout=30).check()


def daemon_reload(host: Transport) -> RunResult:
    return host.run(["systemctl", "daemon-reload"], timeout=60).check()


def restart(host: Transport, profile: str) -> RunResult:
    """(Re)start the profile's unit, enabled first: a promoted agent comes back at every boot
    (after ``avm-boundary.service`` when its drop-in requires it), not only until the host reboots.
    The caller has run ``daemon_reload`` after writing the unit: enabling adds only the symlinks."""
    host.run(["systemctl", "reset-failed", LAYOUT.unit_name(profile)], timeout=30)
    host.run(["systemctl", "enable", "--no-reload", LAYOUT.unit_name(profile)], timeout=60).check()
    return host.run(["systemctl", "restart", LAYOUT.unit_name(profile)], timeout=120)


def stop(host: Transport, profile: str) -> RunResult:
    """Stop the profile's unit and disable it: a stopped (refused, rolled-back) agent stays
    stopped across a reboot."""
    return host.run(["systemctl", "disable", "--now", LAYOUT.unit_name(profile)], timeout=120)


def health(host: Transport, check: HealthCheck, commit: str) -> tuple[bool, dict[str, object], RunResult]:
    """Poll the profile's health endpoint on the host until it reports ``commit``."""
    result = host.run(
        ["python3", "-c", _HEALTH, str(check.port), check.path, commit, str(check.timeout_s)],
        timeout=check.timeout_s + 30,
    )
    try:
        body = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {}
    except ValueError:
        body = {"error": result.stdout[-300:]}
    if not isinstance(body, dict):
        raise OperationalError("health-unparseable", f"health probe printed {result.stdout[:200]!r}")
    return result.ok, body, result
