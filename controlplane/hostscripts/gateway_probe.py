"""Read the egress gateway's admin, and probe the boundary from each profile's sandbox. As root.

argv[1] is JSON ``{"admin": SOCKET, "bundle": PATH, "timeout": s, "profiles": {name: {"user":
U, "listed": {"host", "port", "method", "path", "rpc"?}}}}`` (``profiles`` may be empty: admin
only; ``rpc``: the JSON-RPC body an MCP server is probed with).
One JSON document goes to stdout: ``admin`` (the LDS/CDS versions Envoy accepted, rejected
updates, and each active listener's policy generation, from ``/stats`` and ``/config_dump`` on
its root-only socket) and per profile the probes a child ran as the profile's user inside the
running unit's mount and network namespaces (``nsenter -t MainPID -m -n`` then ``setpriv``):
so it resolves names through the unit's own hosts file and meets the same nftables rules.

- ``listed``: the listed name resolves (to what), and an HTTPS request through the gateway got
  which status (and the gateway's JSON denial reason, if it was one);
- ``wrong_path``: the same name on a path no entry lists: the status and the denial reason;
- ``unlisted``: a name that resolves outside the sandbox (the control) must not resolve inside;
- ``direct``: a TCP connect to a listener this probe opened on the host's own address;
- ``dns``: a DNS query over UDP to a resolver socket this probe opened on that address;
- ``metadata``: a TCP connect to 169.254.169.254:80;
- ``boundary``: ``GET http://avm.boundary/policy``: the status and the policy generation and
  identity the gateway answered with;
- ``granted``: each of the profile's ``granted`` requests (``{"host", "port", "method",
  "path"}``: what approved permission requests added), made through the gateway like ``listed``.

Outcomes are reported, never judged here; the values of headers are never printed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import sys
from typing import Any

CHILD = r"""
import errno, http.client, json, socket, ssl, sys, threading
req = json.loads(sys.argv[1]); t = req["timeout"]; out = {}
def resolve(name):
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)})
    except OSError as e:
        return "error: " + str(e)
def https(host, port, method, path, rpc=None):
    ctx = ssl.create_default_context(cafile=req["bundle"])
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=t)
    try:
        if rpc is not None:  # an MCP server: one JSON-RPC message, as a Streamable HTTP client sends it
            head = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
            conn.request(method, path, body=json.dumps(rpc).encode(), headers=head)
        else:
            conn.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
        resp = conn.getresponse(); body = resp.read(4096)
        reason = None
        try:
            doc = json.loads(body)
            reason = doc.get("reason") if isinstance(doc, dict) and doc.get("denied") is True else None
        except ValueError:
            pass
        return {"status": resp.status, "denied_reason": reason}
    except (OSError, ssl.SSLError) as e:
        return {"error": type(e).__name__ + ": " + str(e)}
    finally:
        conn.close()
def connect(addr, port):
    s = socket.socket(); s.settimeout(t)
    try:
        s.connect((addr, port)); return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return "errno %d" % e.errno
    finally:
        s.close()
def dns(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
    try:
        s.sendto(q, (addr, port)); return "sent"
    except OSError as e:
        return "errno %d" % e.errno
    finally:
        s.close()
def boundary():
    conn = http.client.HTTPConnection("avm.boundary", 80, timeout=t)
    try:
        conn.request("GET", "/policy"); resp = conn.getresponse(); doc = json.loads(resp.read(65536))
        return {"status": resp.status, "policy": doc.get("policy"), "identity": doc.get("identity")}
    except (OSError, ValueError) as e:
        return {"error": type(e).__name__ + ": " + str(e)}
    finally:
        conn.close()
# the two connects that are meant to time out wait side by side, not one after the other
waits = {}
def waited(key, addr, port):
    waits[key] = connect(addr, port)
threads = [threading.Thread(target=waited, args=a) for a in (("direct", req["addr"], req["tcp_port"]),
                                                              ("metadata", "169.254.169.254", 80))]
for th in threads:
    th.start()
l = req["listed"]
out["boundary"] = boundary()
out["granted"] = [https(g["host"], g["port"], g["method"], g["path"]) for g in req.get("granted", [])]
got = https(l["host"], l["port"], l["method"], l["path"], l.get("rpc"))
out["listed"] = {"resolved": resolve(l["host"]), **got}
out["wrong_path"] = https(l["host"], l["port"], "GET", "/avm-probe/not-listed")
out["unlisted"] = {"name": req["unlisted"], "resolved": resolve(req["unlisted"])} if req["unlisted"] else None
out["dns"] = dns(req["addr"], req["udp_port"])
for th in threads:
    th.join()
out["direct"], out["metadata"] = waits["direct"], waits["metadata"]
print(json.dumps(out))
"""


def admin(path: str, timeout: float) -> dict[str, Any]:
    def get(url: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        conn.sock = sock
        try:
            conn.request("GET", url)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    try:
        _, body = get("/stats?format=json&filter=^(listener_manager\\.lds|cluster_manager\\.cds)\\.")
        stats = {s["name"]: s["value"] for s in json.loads(body)["stats"] if "name" in s}
        status, dump = get("/config_dump?resource=dynamic_listeners")
    except OSError as exc:
        return {"error": f"admin socket {path}: {exc}"}
    listeners = {}
    for entry in json.loads(dump).get("configs", []) if status == 200 else []:
        state = entry.get("active_state")
        if state is not None:
            meta = state.get("listener", {}).get("metadata", {}).get("filter_metadata", {}).get("avm", {})
            listeners[entry["name"]] = str(meta.get("policy", ""))
    rejected = sum(
        int(stats.get(f"{p}.{c}", 0))
        for p in ("listener_manager.lds", "cluster_manager.cds")
        for c in ("update_rejected", "update_failure")
    )
    return {
        "lds": str(stats.get("listener_manager.lds.version_text", "")),
        "cds": str(stats.get("cluster_manager.cds.version_text", "")),
        "rejected": rejected,
        "listeners": listeners,
    }


def own_address() -> str | None:
    """The host's first non-loopback IPv4 address (``ip -j -4 addr``)."""
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if not str(info.get("local", "")).startswith("127."):
                return str(info["local"])
    return None


def control_name(listed: set[str]) -> str | None:
    """A name that resolves outside the sandbox: the first of /etc/hosts not listed, not local."""
    with contextlib.suppress(OSError), open("/etc/hosts") as fh:
        for line in fh:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2 or fields[0].startswith(("127.", "::", "fe", "ff")):
                continue
            for name in fields[1:]:
                if name not in listed and "." in name:
                    return name
    return None


def main() -> None:
    req = json.loads(sys.argv[1])
    timeout = float(req.get("timeout", 3.0))
    doc: dict[str, Any] = {"admin": admin(req["admin"], timeout), "profiles": {}}
    addr = own_address()
    if not req["profiles"]:
        print(json.dumps(doc, sort_keys=True))
        return
    listed = {p["listed"]["host"] for p in req["profiles"].values()}
    name = control_name(listed)
    doc["control"] = {"address": addr, "name": name}
    if name is not None:
        try:
            doc["control"]["name_resolved"] = socket.gethostbyname(name)
        except OSError as exc:
            doc["control"]["name_resolved"] = f"error: {exc}"
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind((addr or "127.0.0.1", 0))
        tcp.listen(16)
        udp.bind((addr or "127.0.0.1", 0))
        udp.settimeout(0.2)
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        with socket.create_connection((addr or "127.0.0.1", tcp_port), timeout=timeout):
            doc["control"]["direct"] = "connected"
        for profile, p in sorted(req["profiles"].items()):
            shown = subprocess.run(
                ["systemctl", "show", "-p", "MainPID", "--value", f"agent-gateway@{profile}.service"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            if not shown.isdigit() or shown == "0":
                doc["profiles"][profile] = {"error": "the unit is not running"}
                continue
            child = {
                "timeout": timeout,
                "bundle": req["bundle"],
                "listed": p["listed"],
                "granted": p.get("granted", []),
                "unlisted": name,
                "addr": addr or "127.0.0.1",
                "tcp_port": tcp_port,
                "udp_port": udp_port,
            }
            user = p["user"]
            argv = ["nsenter", "-t", shown, "-m", "-n", "--", "setpriv", "--reuid", user, "--regid", user]
            argv += ["--clear-groups", "python3", "-c", CHILD, json.dumps(child)]
            run = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
            )
            try:
                result = json.loads(run.stdout)
            except ValueError:
                result = {"error": f"rc {run.returncode}: {run.stderr.strip()[-300:]}"}
            received = []
            with contextlib.suppress(OSError):
                while True:
                    received.append(udp.recv(512))
            result["dns_received"] = len(received)
            doc["profiles"][profile] = result
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
            ctl.sendto(b"control", (addr or "127.0.0.1", udp_port))
        try:
            doc["control"]["dns"] = "received" if udp.recv(512) == b"control" else "other"
        except OSError:
            doc["control"]["dns"] = "not received"
    print(json.dumps(doc, sort_keys=True))


if __name__ == "__main__":
    main()
