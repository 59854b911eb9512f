"""A Tier-1 target's gateway options: a private upstream CA and pinned upstream addresses.

``<home>/egress/<target>/gateway.json`` holds ``{"upstream_ca": PEM path, "upstreams":
{"host:port": [addr, port]}}``. The gateway verifies re-originated TLS against ``upstream_ca``
instead of the system store, and connects to a pinned address instead of resolving the name
(a private upstream, or a test one). ``avm egress options`` edits it through ``update``, which
validates everything first and writes the file atomically: a refused change leaves it as it was.
The options take effect at the next ``avm promote --apply`` or ``avm egress apply --apply``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane._internal.fs import write_atomic
from controlplane.errors import UsageError

if TYPE_CHECKING:
    from controlplane.home import Home

FILE = "gateway.json"
CA_FILE = "upstream-ca.pem"


def path(home: Home, target: str) -> Path:
    return home.root / "egress" / target / FILE


def _invalid(what: str, expected: str, actual: object, hint: str = "fix or remove the file") -> UsageError:
    return UsageError(
        "gateway-options-invalid",
        f"{what}: expected {expected}, got {actual!r}",
        hint=hint,
        details={"expected": expected, "actual": str(actual)},
    )


def read(home: Home, target: str) -> tuple[bytes | None, dict[str, tuple[str, int]]]:
    """The upstream CA's PEM bytes (or None) and the pins, as the renderer takes them."""
    p = path(home, target)
    if not p.exists():
        return None, {}
    try:
        doc = json.loads(p.read_text())
        ca = Path(doc["upstream_ca"]).read_bytes() if doc.get("upstream_ca") else None
        pins = {k: (str(v[0]), int(v[1])) for k, v in doc.get("upstreams", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UsageError(
            "gateway-options-invalid",
            f"{p}: expected {{upstream_ca: PEM path, upstreams: {{host:port: [addr, port]}}}}: {exc}",
            hint="fix or remove the file, or set it with `avm egress options`",
        ) from exc
    return ca, pins


def _destination(text: str) -> str:
    from controlplane.boundary.policy import NameRule

    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise _invalid(
            "--pin/--unpin destination", "HOST:PORT of a listed name", text, "e.g. api.example.com:443"
        )
    try:  # the policy's own name rules (a bad name is refused with its egress-name-* code)
        rule = NameRule(host=host, port=int(port), methods=("GET",), paths=("/",))
    except ValueError as exc:
        raise _invalid("--pin destination", "HOST:PORT of a listed name", text, str(exc)) from exc
    return rule.key


def _address(text: str) -> list[Any]:
    addr, sep, port = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
        number = int(port)
    except ValueError:
        raise _invalid("--pin address", "ADDR:PORT with an IP address", text, "e.g. 10.0.0.7:8443") from None
    if not sep or not 0 < number < 65536:
        raise _invalid("--pin address", "ADDR:PORT with a port 1-65535", text, "e.g. 10.0.0.7:8443")
    return [str(ip), number]


def _certificate(pem: Path) -> bytes:
    from cryptography import x509

    try:
        data = pem.read_bytes()
        certs = x509.load_pem_x509_certificates(data)
    except (OSError, ValueError) as exc:
        raise _invalid("--upstream-ca", "a readable PEM file of CA certificates", str(pem), str(exc)) from exc
    if not certs:
        raise _invalid("--upstream-ca", "at least one certificate", str(pem), "no certificate in the file")
    return data


def current(home: Home, target: str) -> dict[str, Any]:
    read(home, target)  # refuses an unusable file with its own error
    p = path(home, target)
    doc: dict[str, Any] = json.loads(p.read_text()) if p.exists() else {}
    return {
        "upstream_ca": doc.get("upstream_ca"),
        "upstreams": dict(sorted(doc.get("upstreams", {}).items())),
    }


def update(
    home: Home,
    target: str,
    *,
    upstream_ca: Path | None = None,
    no_upstream_ca: bool = False,
    pins: Sequence[str] = (),
    unpins: Sequence[str] = (),
    clear: bool = False,
) -> dict[str, Any]:
    """Validate every change, then write the options once. Returns the options now on disk."""
    doc = {"upstream_ca": None, "upstreams": {}} if clear else current(home, target)
    upstreams: dict[str, Any] = dict(doc["upstreams"])
    for text in unpins:
        key = _destination(text)
        if key not in upstreams:
            raise _invalid("--unpin", "a pinned destination", key, f"pinned: {sorted(upstreams) or 'none'}")
        del upstreams[key]
    for text in pins:
        dest, sep, addr = text.partition("=")
        if not sep:
            raise _invalid("--pin", "HOST:PORT=ADDR:PORT", text, "e.g. api.example.com:443=10.0.0.7:8443")
        upstreams[_destination(dest)] = _address(addr)
    ca_bytes = _certificate(upstream_ca) if upstream_ca is not None else None
    p = path(home, target)
    if ca_bytes is not None:
        write_atomic(p.parent / CA_FILE, ca_bytes, 0o600)
        doc["upstream_ca"] = str(p.parent / CA_FILE)
    elif no_upstream_ca:
        doc["upstream_ca"] = None
    out: Mapping[str, Any] = {"upstream_ca": doc["upstream_ca"], "upstreams": dict(sorted(upstreams.items()))}
    body = {k: v for k, v in out.items() if v}
    write_atomic(p, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode(), 0o600)
    return dict(out)
