"""The MCP pinning service of the host's job gateway (``controlplane.boundary.mcppin``, its own process).

When a job's listener lists an ``mcp:`` name, ``address(root, netns)`` starts ``mcppin.py`` (a
``hostproc.Helper`` in ``<root>/mcppin/``) inside the gateway's uplink namespace, where Envoy's
pin cluster connects and where the MCP server is reachable, on 127.0.0.1 and a port it picks
itself (``ready 127.0.0.1:PORT``), before the listener that routes to it is added. ``write``
puts the rendering's ``Rendered.mcp_pin`` in its config on every listener change (the service
re-reads the file when it changes). Whichever job run removes the last MCP listener stops it
(``stop``). A service that died is no judgement: Envoy gets no connection and the guest a 503,
nothing reaches the server; the next listener change starts it again.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from controlplane._internal.fs import write_atomic
from controlplane.boundary import mcppin
from controlplane.boundary.hostproc import Helper
from controlplane.errors import OperationalError

NAME = "mcppin"
LISTEN = "127.0.0.1"
_READY_RE = re.compile(r"^ready (127\.0\.0\.1):([0-9]{1,5})$")


def config_path(root: Path) -> Path:
    return root / NAME / "config.json"


def write(root: Path, config: dict[str, Any]) -> None:
    """Replace the service's config (rules and pins), 0600, renamed over."""
    write_atomic(config_path(root), json.dumps(config, sort_keys=True).encode(), 0o600)


def running(root: Path) -> bool:
    return Helper(root, NAME).alive()


def _parse(line: str) -> tuple[str, int]:
    found = _READY_RE.fullmatch(line.strip())
    if found is None:
        raise OperationalError(
            "mcp-pin-not-running",
            f"the job gateway's MCP pinning service announced {line!r}, expected 'ready {LISTEN}:PORT'",
        )
    return found.group(1), int(found.group(2))


def address(root: Path, netns: str | None) -> tuple[str, int]:
    """Where the running service listens, starting it (with no rules yet) unless it runs.
    Raises ``OperationalError('mcp-pin-not-running')`` when it does not become ready."""
    helper = Helper(root, NAME)
    if helper.alive():
        return _parse(helper.ready_line())
    helper.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write(root, {"listen": [LISTEN, 0], "rules": {}})
    argv = [sys.executable, str(Path(mcppin.__file__)), str(config_path(root))]
    return _parse(helper.start(argv, code="mcp-pin-not-running", what="MCP pinning service", netns=netns))


def stop(root: Path) -> None:
    """Stop the service (nothing when none runs) and remove its pid file, log and config."""
    Helper(root, NAME).stop(config_path(root))
