"""`avm secrets put`: values from stdin only, stored 0600, never echoed; bad refs refused."""

from __future__ import annotations

import os
import subprocess
import sys

from controlplane.governance import secrets
from controlplane.home import Home


def put(home: Home, ref: str, value: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "controlplane", "--home", str(home.root), "secrets", "put", ref],
        input=value,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_put_stores_0600_and_never_echoes_the_value(home: Home) -> None:
    value = b"v-" + os.urandom(12).hex().encode()
    out = put(home, "secret://local/api-token", value)
    assert out.returncode == 0, out.stderr
    assert value not in out.stdout + out.stderr
    assert secrets.resolve(home, "secret://local/api-token") == value
    path = secrets.store_dir(home, "local") / "api-token"
    assert path.stat().st_mode & 0o777 == 0o600


def test_bad_input_is_refused_and_nothing_is_stored(home: Home) -> None:
    assert put(home, "secret://local/x", b"").returncode == 64
    assert put(home, "secret://local/../escape", b"v").returncode == 64
    assert put(home, "secret://vault/x", b"v").returncode == 3
    assert put(home, "plain-value", b"v").returncode == 64
    assert not (home.root / "secrets").exists() or not any((home.root / "secrets").rglob("*x*"))
    assert not (home.root / "escape").exists()
