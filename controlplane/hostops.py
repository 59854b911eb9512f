"""Mutating operations on a Tier-1 host, each one argv (or one put) through the transport.

Small stdlib programs run with the host's ``python3 -c`` where an operation must be atomic
or verified on the host itself (release unpacking, the ``current`` flip, health checks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from controlplane.errors import OperationalError
from controlplane.facts import ETC, PROFILES, RELEASES, UNIT_DIR
from controlplane.material import HealthCheck, ReleaseMaterial
from controlplane.transport.base import RunResult, Transport

# Unpack a release tar write-once: into a temp dir, verify every file against the signed file
# list, make it read-only, then rename into place. An existing release is never touched.
_UNPACK = r"""
import hashlib, json, os, shutil, sys, tarfile
tar_path, final, want = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if os.path.exists(final):
    sys.exit("release exists: " + final)
tmp = final + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
with tarfile.open(tar_path) as tar:
    for m in tar.getmembers():
        parts = m.name.split("/")
        if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym()):
            sys.exit("unsafe member: " + m.name)
        dest = os.path.join(tmp, m.name)
        if m.isdir():
            os.makedirs(dest, exist_ok=True)
        elif m.issym():
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.symlink(m.linkname, dest)
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with tar.extractfile(m) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(dest, 0o555 if m.mode & 0o111 else 0o444)
got = {}
for base, dirs, files in os.walk(tmp):
    for name in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
        full = os.path.join(base, name)
        rel = os.path.relpath(full, tmp)
        if os.path.islink(full):
            got[rel] = "symlink:" + os.readlink(full)
        else:
            with open(full, "rb") as fh:
                got[rel] = "sha256:" + hashlib.sha256(fh.read()).hexdigest()
if got != want:
    shutil.rmtree(tmp)
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    sys.exit("content differs from the signed file list: " + ", ".join(bad[:10]))
for base, dirs, files in os.walk(tmp):
    os.chmod(base, 0o555)
os.rename(tmp, final)
os.unlink(tar_path)
"""

_FLIP = r"""
import os, sys
target, link = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(link), exist_ok=True)
tmp = link + ".new"
if os.path.lexists(tmp):
    os.unlink(tmp)
os.symlink(target, tmp)
os.replace(tmp, link)
"""

# Health means the service answers and reports the expected commit, not that a symlink points at it.
_HEALTH = r"""
import json, sys, time, urllib.request
port, path, commit, deadline = int(sys.argv[1]), sys.argv[2], sys.argv[3], time.time() + float(sys.argv[4])
last = "no answer"
while time.time() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=2) as r:
            body = json.loads(r.read())
        if body.get("commit") == commit:
            print(json.dumps(body)); sys.exit(0)
        last = "reports commit %s" % body.get("commit")
    except Exception as exc:
        last = "%s: %s" % (type(exc).__name__, exc)
    time.sleep(0.2)
print(json.dumps({"error": last})); sys.exit(1)
"""


def release_dir(sha: str) -> str:
    return f"{RELEASES}/{sha}"


def current_link(profile: str) -> str:
    return f"{PROFILES}/{profile}/current"


def unit_name(profile: str) -> str:
    return f"agent-gateway@{profile}.service"


def create_release(host: Transport, rel: ReleaseMaterial) -> RunResult:
    host.run(["mkdir", "-p", f"{RELEASES}/.incoming"], timeout=30).check()
    tar_path = f"{RELEASES}/.incoming/{rel.sha}.tar"
    host.put(rel.bundle, tar_path, mode=0o600)
    result = host.run(
        ["python3", "-c", _UNPACK, tar_path, release_dir(rel.sha), json.dumps(rel.files, sort_keys=True)],
        timeout=300,
    )
    return result.check(hint="the release directory was not created; nothing else changed")


def install_unit(host: Transport, unit: bytes) -> None:
    host.put(unit, f"{UNIT_DIR}/agent-gateway@.service", mode=0o644)


def ensure_user(host: Transport, profile: str) -> RunResult:
    user = f"agent-{profile}"
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
        "write-env": (f"{ETC}/{profile}.env", 0o600),
        "write-policy": (f"{ETC}/{profile}.policy.json", 0o644),
        "write-dropin": (f"{UNIT_DIR}/agent-gateway@{profile}.service.d/avm.conf", 0o644),
    }[kind]


def write_profile_file(host: Transport, kind: str, profile: str, data: bytes) -> str:
    path, mode = profile_file(kind, profile)
    host.run(["mkdir", "-p", path.rsplit("/", 1)[0]], timeout=30).check()
    host.put(data, path, mode=mode)
    return path


def credential_path(profile: str, name: str) -> str:
    return f"{ETC}/credentials/{profile}/{name}"


def write_credentials(host: Transport, profile: str, values: Mapping[str, bytes]) -> list[str]:
    """Write secret values as systemd credential files (root-only, 0600). Returns the paths."""
    host.run(["mkdir", "-p", "-m", "0700", f"{ETC}/credentials/{profile}"], timeout=30).check()
    paths = []
    for name, value in sorted(values.items()):
        path = credential_path(profile, name)
        host.put(value, path, mode=0o600)
        paths.append(path)
    return paths


def remove_user(host: Transport, profile: str) -> RunResult:
    """Remove a profile user that a failed apply created (its unit is stopped by then)."""
    return host.run(["userdel", f"agent-{profile}"], timeout=60)


def flip(host: Transport, profile: str, target: str) -> RunResult:
    return host.run(["python3", "-c", _FLIP, target, current_link(profile)], timeout=30).check()


def daemon_reload(host: Transport) -> RunResult:
    return host.run(["systemctl", "daemon-reload"], timeout=60).check()


def restart(host: Transport, profile: str) -> RunResult:
    host.run(["systemctl", "reset-failed", unit_name(profile)], timeout=30)
    return host.run(["systemctl", "restart", unit_name(profile)], timeout=120)


def stop(host: Transport, profile: str) -> RunResult:
    return host.run(["systemctl", "stop", unit_name(profile)], timeout=120)


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
