"""The content classifier of the host's job gateway: the reference classifier as its own process.

When a job's listener lists an ``inspect: true`` name, ``ensure(root)`` starts
``python -m controlplane.boundary.classifyd`` on a unix socket in ``<root>/classifier/`` (a
``hostproc.Helper``: 0700, root's, inside the gateway's own directory, in no job's namespace;
Envoy reaches it by path, the guest cannot) and waits until it is ready, before the listener
that needs it is added. Whichever job run removes the last inspected listener stops it
(``stop``). A classifier that died is no verdict: the gateway's ``ext_authz`` filter fails
closed (``classifier-unavailable``, 403), it never lets a request through unasked.
"""

from __future__ import annotations

import sys
from pathlib import Path

from controlplane.boundary.hostproc import Helper


def socket_path(root: Path) -> Path:
    """Where the gateway rooted at ``root`` reaches its classifier."""
    return root / "classifier" / "classifier.sock"


def running(root: Path) -> bool:
    """The recorded classifier process is alive and its socket exists."""
    return Helper(root, "classifier").alive() and socket_path(root).is_socket()


def ensure(root: Path) -> Path:
    """Start the classifier unless it runs; returns its socket. Raises
    ``OperationalError('classifier-not-running')`` when it does not become ready."""
    sock = socket_path(root)
    if not running(root):
        argv = [sys.executable, "-m", "controlplane.boundary.classifyd", "--listen", f"unix:{sock}"]
        Helper(root, "classifier").start(argv, code="classifier-not-running", what="classifier")
    return sock


def stop(root: Path) -> None:
    """Stop the classifier (nothing when none runs) and remove its pid file and socket."""
    Helper(root, "classifier").stop(socket_path(root))
