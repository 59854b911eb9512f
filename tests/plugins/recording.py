"""A recording fake at the transport seam: scripted ``run`` results by argv prefix, and every
``run``/``put``/``get`` recorded in order.

It stands in for a host only where a test proves the *logic* above the seam (which commands the
apply sends, in which order, what it puts back after a failure); what a real host does with those
commands is proved by the nspawn tests. ``put``/``get`` act on an in-memory file table, and
``rm -f PATH...`` removes from it (the one command the fake understands, so that what ``put``
wrote and a rollback removed stays consistent); every other command gets its scripted reply, or
rc 0 with no output. ``fail_put`` makes the next puts to a path raise, one error per put.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from controlplane.errors import OperationalError
from controlplane.transport.base import RunResult, masked


@dataclasses.dataclass(frozen=True)
class Reply:
    rc: int = 0
    stdout: str = ""
    stderr: str = ""


# a fixed reply, one per call in turn (the last one repeats), or one computed from the argv
Script = Reply | list[Reply] | Callable[[list[str]], Reply]


@dataclasses.dataclass(frozen=True)
class Call:
    op: str  # "run", "put" or "get"
    argv: tuple[str, ...] = ()  # run: the masked argv
    path: str = ""  # put/get
    data: bytes = b""  # put
    mode: int = 0  # put


class RecordingTransport:
    url = "recording://host"

    def __init__(
        self,
        scripts: Sequence[tuple[Sequence[str], Script]] = (),
        files: dict[str, bytes] | None = None,
        fail_put: dict[str, list[Exception]] | None = None,
    ) -> None:
        self.scripts = [(tuple(prefix), script) for prefix, script in scripts]
        self.files: dict[str, bytes] = dict(files or {})
        self.modes: dict[str, int] = {}
        self.fail_put = {path: list(errors) for path, errors in (fail_put or {}).items()}
        self.calls: list[Call] = []
        self._turn: dict[int, int] = {}
        self.closed = False

    def _reply(self, argv: list[str]) -> Reply | None:
        for index, (prefix, script) in enumerate(self.scripts):
            if tuple(argv[: len(prefix)]) != prefix:
                continue
            if isinstance(script, Reply):
                return script
            if isinstance(script, list):
                turn = self._turn.get(index, 0)
                self._turn[index] = turn + 1
                return script[min(turn, len(script) - 1)]
            return script(argv)
        return None

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 60.0,
        secrets: Sequence[str] = (),
    ) -> RunResult:
        args = list(argv)
        shown = masked(args, secrets)
        self.calls.append(Call("run", argv=tuple(shown)))
        reply = self._reply(args)
        if reply is None:
            reply = Reply()
            if args[:2] == ["rm", "-f"]:
                for path in args[2:]:
                    self.files.pop(path, None)
        return RunResult(argv=shown, rc=reply.rc, stdout=reply.stdout, stderr=reply.stderr, duration_s=0.0)

    def put(self, data: bytes, path: str, mode: int = 0o644) -> None:
        self.calls.append(Call("put", path=path, data=data, mode=mode))
        if self.fail_put.get(path):
            raise self.fail_put[path].pop(0)
        self.files[path] = data
        self.modes[path] = mode

    def get(self, path: str) -> bytes:
        self.calls.append(Call("get", path=path))
        if path not in self.files:
            raise OperationalError("remote-file-missing", f"{path} does not exist on {self.url}")
        return self.files[path]

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> RecordingTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ran(self, *prefix: str) -> list[tuple[str, ...]]:
        """The argv of every ``run`` that starts with ``prefix``, in order."""
        return [c.argv for c in self.calls if c.op == "run" and c.argv[: len(prefix)] == prefix]

    def puts(self) -> list[str]:
        return [c.path for c in self.calls if c.op == "put"]
