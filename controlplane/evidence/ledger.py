"""The receipt store: one file per receipt, appended atomically under a lock.

Layout of ``receipts/``::

    00000001.json ...   stored envelopes (canonical JSON), named by sequence number
    HEAD                {"seq": N, "digest": "<sha256 hex of receipt N>"}
    .lock               fcntl lock serialising writers (threads and processes)

An append writes a temp file, fsyncs it, renames it to its sequence name, fsyncs the directory,
then moves HEAD forward the same way. A crash leaves either no new receipt or a complete one; a
complete receipt that HEAD does not yet name is found and adopted by the next append.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from controlplane._internal.fs import write_atomic
from controlplane._internal.loading import Frozen
from controlplane.errors import OperationalError
from controlplane.evidence.receipt import digest_of

NAME_WIDTH = 8
HEAD = "HEAD"


class Head(Frozen):
    seq: int
    digest: str | None


EMPTY = Head(seq=0, digest=None)


def receipt_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:0{NAME_WIDTH}d}.json"


def read_head(directory: Path) -> Head:
    """HEAD as recorded (``EMPTY`` for a new store). Raises ``OperationalError('head-unreadable')``."""
    try:
        return Head.model_validate_json((directory / HEAD).read_bytes())
    except FileNotFoundError:
        return EMPTY
    except ValueError as exc:
        raise OperationalError(
            "head-unreadable",
            f"{directory / HEAD} is not a valid HEAD record",
            hint="run `avm receipts verify` to see the state of the chain",
        ) from exc


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _current(directory: Path) -> Head:
    """HEAD, rolled forward over complete receipts a crash left un-named (caller holds the lock)."""
    head = read_head(directory)
    while True:
        nxt = receipt_path(directory, head.seq + 1)
        try:
            data = nxt.read_bytes()
        except FileNotFoundError:
            return head
        head = Head(seq=head.seq + 1, digest=digest_of(data))


def append(directory: Path, build: Callable[[int, str | None], bytes], *, durable: bool = True) -> Head:
    """Append one receipt. ``build(seq, prev_digest)`` returns the stored bytes to write.

    Building happens under the lock, so the receipt names the true predecessor even with many
    concurrent writers. ``durable=False`` skips fsync (benchmark chain generation only).
    """
    with locked(directory):
        head = _current(directory)
        seq = head.seq + 1
        data = build(seq, head.digest)
        path = receipt_path(directory, seq)
        if path.exists():  # cannot happen under the lock; never overwrite evidence
            raise OperationalError("receipt-exists", f"{path} already exists; refusing to overwrite")
        write_atomic(path, data, durable=durable)
        new = Head(seq=seq, digest=digest_of(data))
        write_atomic(directory / HEAD, json.dumps(new.model_dump()).encode(), durable=durable)
        return new


def read(directory: Path, seq: int) -> bytes:
    """Stored bytes of receipt ``seq``. Raises ``OperationalError('receipt-not-found')``."""
    try:
        return receipt_path(directory, seq).read_bytes()
    except FileNotFoundError as exc:
        raise OperationalError(
            "receipt-not-found",
            f"no receipt #{seq} in {directory}",
            hint="`avm receipts list` shows the receipts there are",
            details={"expected": f"receipt #{seq}", "actual": f"HEAD is #{read_head(directory).seq}"},
        ) from exc


def last_seq(directory: Path) -> int:
    """The highest sequence number there is evidence of: a file, or HEAD (whichever is higher)."""
    return max(max_file_seq(directory), read_head(directory).seq)


def iter_stored(directory: Path, first: int = 1) -> Iterator[tuple[int, bytes | None]]:
    """Every sequence number from ``first`` to ``last_seq`` with its stored bytes, or None where
    the file is missing. Streams: one receipt in memory at a time."""
    for seq in range(first, last_seq(directory) + 1):
        try:
            yield seq, receipt_path(directory, seq).read_bytes()
        except FileNotFoundError:
            yield seq, None


def count_files(directory: Path) -> int:
    """How many receipt files exist (streamed: constant memory for any chain length)."""
    if not directory.exists():
        return 0
    with os.scandir(directory) as entries:
        return sum(1 for e in entries if e.name.endswith(".json") and e.name[:NAME_WIDTH].isdigit())


def max_file_seq(directory: Path) -> int:
    best = 0
    if not directory.exists():
        return 0
    with os.scandir(directory) as entries:
        for e in entries:
            stem = e.name.removesuffix(".json")
            if e.name.endswith(".json") and stem.isdigit():
                best = max(best, int(stem))
    return best
