"""A helper process of the host's job gateway (the classifier, the MCP pinning service).

``Helper(root, name)`` owns ``<root>/<name>/`` (0700, root's: the gateway's own directory, in no
job's namespace). ``start(argv, netns=...)`` runs the helper in its own session (inside
``netns`` through ``ip netns exec``, which execs it: the recorded pid is the helper's), its
stdout and stderr to ``log`` in that directory, and waits for its first line, which starts
with ``ready``; the pid is recorded in ``pid`` beside it, so whichever job run removes the last
listener that needs the helper stops it (``stop``), even when another process started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane._internal.netns import in_netns
from controlplane.boundary import envoy
from controlplane.errors import OperationalError

READY_WAIT_S = 15.0
_RUNNING: dict[Path, subprocess.Popen[bytes]] = {}  # helpers this process started (reaped on stop)


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (not a zombie); the host gateway's Envoy uses it too."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class Helper:
    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.log = self.dir / "log"

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def alive(self) -> bool:
        return alive(self.pid())

    def ready_line(self) -> str:
        """The helper's first output line ('' before it wrote one)."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text.split("\n", 1)[0] if "\n" in text else ""

    def start(self, argv: Sequence[str], *, code: str, what: str, netns: str | None = None) -> str:
        """Start the helper (stopping a dead one's leftovers first); returns its ready line.
        Raises ``OperationalError(code)`` when it exits or prints no ``ready`` line within
        ``READY_WAIT_S`` (it is stopped then; the hint has the end of its output)."""
        self.stop()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            proc = subprocess.Popen(
                in_netns(netns, argv) if netns else list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        _RUNNING[self.dir] = proc
        write_atomic(self.dir / "pid", f"{proc.pid}\n".encode(), 0o600)
        envoy.wait_until(lambda: bool(self.ready_line()) or proc.poll() is not None, READY_WAIT_S, 0.05)
        line = self.ready_line()
        if proc.poll() is not None or not line.startswith("ready"):
            out = self.log.read_text(errors="replace")[-800:] if self.log.exists() else ""
            self.stop()
            raise OperationalError(
                code,
                f"the job gateway's {what} was not ready within {READY_WAIT_S:.0f} s "
                f"(exit status {proc.poll()}, first line {line!r})",
                hint=f"its output: {out.strip() or '(empty)'}",
            )
        return line

    def stop(self, *leftovers: Path) -> None:
        """Stop the helper (nothing when none runs); remove its pid file, log and ``leftovers``."""
        proc = _RUNNING.pop(self.dir, None)
        pid = proc.pid if proc is not None else self.pid()
        if alive(pid):
            assert pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            if proc is not None:
                proc.wait(10)
            envoy.wait_until(lambda: not alive(pid), 10.0, 0.05)
        elif proc is not None:
            proc.wait(10)
        for path in (self.dir / "pid", self.log, *leftovers):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
