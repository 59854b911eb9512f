"""``local://``: run commands on this machine with subprocess, argv only, never a shell."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane.errors import CommandTimeout, OperationalError
from controlplane.transport.base import RunResult, mask, masked


class LocalTransport:
    url = "local://"

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        secrets: Sequence[str] = (),
    ) -> RunResult:
        args = [str(a) for a in argv]
        shown = masked(args, secrets)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                args,
                input=stdin if stdin is not None else b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(
                shown, timeout, _text(exc.stdout, secrets), _text(exc.stderr, secrets)
            ) from None
        except FileNotFoundError as exc:
            raise OperationalError(
                "tool-missing",
                f"`{args[0]}` is not installed or not on PATH",
                hint="run `make setup` (as root it installs the Debian packages avm needs)",
                details={"argv": shown},
            ) from exc
        return RunResult(
            argv=shown,
            rc=proc.returncode,
            stdout=_text(proc.stdout, secrets),
            stderr=_text(proc.stderr, secrets),
            duration_s=time.monotonic() - start,
        )

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        write_atomic(Path(path), data, mode, parent_mode=0o755)

    def get(self, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise OperationalError("remote-file-missing", f"{path} does not exist on {self.url}") from None

    def close(self) -> None:
        return None  # nothing is held open: each command is its own process

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _text(data: bytes | str | None, secrets: Sequence[str]) -> str:
    if data is None:
        return ""
    return mask(data.decode("utf-8", "replace") if isinstance(data, bytes) else data, secrets)
