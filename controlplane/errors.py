"""Errors and exit codes: the one leaf module every other module may import.

Every expected failure is an ``AvmError`` with a stable kebab-case ``code``, a message that says
what happened (with expected and actual values where there are any) and a ``hint`` that says what
to do. The CLI's error boundary turns them into diagnostics and the exit code below; anything
else is a bug and is printed with its traceback. This module imports nothing from the package but
the code registry (``errorcodes``, plain data), so it can never be part of an import cycle.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

from controlplane.errorcodes import REGISTRY


class ExitCode(enum.IntEnum):
    """Process exit codes of ``avm``. Documented in ``avm --help`` and docs/cli.md."""

    OK = 0  # success / in sync
    ERROR = 1  # operational error (a host, a tool or the disk failed)
    DRIFT = 2  # `avm status` found the host differs from the last applied receipt
    REFUSED = 3  # verification, policy or a gate refused; nothing was changed
    JOB_FAILED = 4  # `avm job run`: the job ran and exited non-zero (its own code is in the output)
    USAGE = 64  # bad command line or bad input file (EX_USAGE); Click's 2 would collide with DRIFT
    TIMEOUT = 124  # `avm job run`: the job hit its hard timeout and was killed
    INTERRUPTED = 130  # SIGINT/SIGTERM: the command stopped after tearing down what it started


EXIT_CODE_HELP = {
    ExitCode.OK: "success / in sync",
    ExitCode.ERROR: "operational error",
    ExitCode.DRIFT: "drift found (status)",
    ExitCode.REFUSED: "refused: verification, policy or gate failed, nothing changed",
    ExitCode.JOB_FAILED: "job run: the job exited non-zero (its code is in the output)",
    ExitCode.USAGE: "usage error: bad arguments or invalid input",
    ExitCode.TIMEOUT: "job run: the job hit its hard timeout",
    ExitCode.INTERRUPTED: "interrupted (SIGINT/SIGTERM), after teardown",
}


class AvmError(Exception):
    """An expected failure with a stable code, a clear message and a hint.

    ``details`` carries structured facts (expected/actual values, rc, paths) for ``--json``
    output and receipts. It must never carry secret values.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.ERROR

    def __init__(
        self,
        code: str,
        message: str,
        *,
        hint: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        if __debug__:
            check_code(code, type(self))
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.details: dict[str, Any] = dict(details or {})
        # the number of the receipt that records this error, once one does (set by evidence)
        self.receipt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "exit_code": int(self.exit_code),
        }
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        if self.receipt is not None:
            out["receipt"] = self.receipt
        return out

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class OperationalError(AvmError):
    """A host, tool, disk or network failed while doing what was asked (exit 1)."""

    exit_code = ExitCode.ERROR


class RefusedError(AvmError):
    """Verification, policy or a gate refused the request; nothing was changed (exit 3)."""

    exit_code = ExitCode.REFUSED


class UsageError(AvmError):
    """The command line or an input document is invalid (exit 64)."""

    exit_code = ExitCode.USAGE


class CommandFailed(OperationalError):
    """An external command exited non-zero. Keeps argv (masked), rc, stdout and stderr."""

    def __init__(
        self,
        argv: list[str],
        rc: int,
        stdout: str,
        stderr: str,
        *,
        hint: str = "",
        code: str = "command-failed",
    ) -> None:
        tail = (stderr.strip() or stdout.strip())[-800:]
        super().__init__(
            code,
            f"`{' '.join(argv)}` exited {rc}" + (f": {tail}" if tail else ""),
            hint=hint,
            details={"argv": argv, "rc": rc, "stdout": stdout[-4000:], "stderr": stderr[-4000:]},
        )
        self.argv = argv
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


class CommandTimeout(OperationalError):
    """An external command did not finish within its deadline and was killed."""

    def __init__(self, argv: list[str], timeout: float, stdout: str = "", stderr: str = "") -> None:
        super().__init__(
            "command-timeout",
            f"`{' '.join(argv)}` did not finish within {timeout:g}s and was killed",
            hint="the host may be overloaded or hung; raise the timeout only if the work is known to be slow",
            details={"argv": argv, "timeout_s": timeout, "stdout": stdout[-4000:], "stderr": stderr[-4000:]},
        )
        self.argv = argv
        self.timeout = timeout


# Every code avm raises -> the class it is raised with (so its exit code) and its meaning; the
# data is controlplane/errorcodes.py. The constructor asserts a code is registered for its class.
_CLASSES: dict[str, type[AvmError]] = {
    "operational": OperationalError,
    "refused": RefusedError,
    "usage": UsageError,
}
CODES: Mapping[str, tuple[type[AvmError], str]] = {
    code: (_CLASSES[kind], meaning) for code, (kind, meaning) in REGISTRY.items()
}


def check_code(code: str, cls: type[AvmError]) -> None:
    """Raise ``AssertionError`` unless ``code`` is registered for ``cls`` (or a superclass of it)."""
    entry = CODES.get(code)
    if entry is None:
        raise AssertionError(f"error code {code!r} is not in controlplane.errors.CODES")
    if not issubclass(cls, entry[0]):
        raise AssertionError(
            f"error code {code!r} is registered for {entry[0].__name__}, raised as {cls.__name__}"
        )


def code_table() -> str:
    """The Markdown table of every code, its exit code and meaning (docs/cli.md holds it)."""
    rows = [
        f"| `{code}` | {int(cls.exit_code)} | {meaning} |" for code, (cls, meaning) in sorted(CODES.items())
    ]
    return "\n".join(["| code | exit | meaning |", "|---|---|---|", *rows])
