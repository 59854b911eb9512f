"""The host apply lock: exclusive, and a holder killed with -9 never wedges the next promote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.errors import RefusedError
from controlplane.promote import hostlock
from controlplane.transport.local import LocalTransport


def test_second_holder_is_refused_and_lock_is_released_after(tmp_path: Path) -> None:
    lock = str(tmp_path / "apply.lock")
    host = LocalTransport()
    with hostlock.hold(host, "promote", lock) as facts:
        assert facts["took_over"] is None
        with pytest.raises(RefusedError) as info, hostlock.hold(host, "promote", lock):
            pass
        assert info.value.code == "host-locked"
        assert Path(lock).is_dir()  # the refused attempt did not disturb the holder
    assert not Path(lock).exists()


def test_lock_of_a_killed_holder_is_taken_over_and_reported(tmp_path: Path) -> None:
    lock = str(tmp_path / "apply.lock")
    code = (
        "import sys, time\n"
        "from controlplane.promote import hostlock\n"
        "from controlplane.transport.local import LocalTransport\n"
        "with hostlock.hold(LocalTransport(), 'promote', sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, lock], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RefusedError), hostlock.hold(LocalTransport(), "promote", lock):  # alive: refused
        pass
    proc.kill()
    proc.wait()
    assert Path(lock, "owner.json").exists()  # kill -9 left the lock behind
    with hostlock.hold(LocalTransport(), "promote", lock) as facts:
        assert facts["took_over"]["reason"].startswith(f"holder pid {proc.pid}")
        assert json.loads(Path(lock, "owner.json").read_text())["purpose"] == "promote"
    assert not list(tmp_path.iterdir())  # nothing stale left aside


def test_expired_lease_is_stale_and_foreign_live_holder_is_not() -> None:
    assert hostlock.stale_reason({"acquired_at": 0, "lease_s": 10}, now=100) == "lease expired"
    foreign = {"control_host": "elsewhere", "pid": 1, "acquired_at": 90, "lease_s": 3600}
    assert hostlock.stale_reason(foreign, now=100) is None
