"""The permission-request recorder (``avm-requests.service``, user ``avm-requests``). Stdlib only.

``serve``: socket-activated by ``avm-requests.socket`` (fd 3, a unix socket only the gateway's
group may connect to). The gateway routes an agent's ``POST http://avm.boundary/requests`` here
with ``x-avm-identity`` set from the listener; this stores the body as it came, with that
identity and the time, as ``/var/lib/avm-requests/<id>.json`` (0640), and answers 202 with the
request id. It judges nothing (the control plane does, on collection) and can change nothing:
it holds no policy, no key, and has no network but its socket. Bounded: a body of at most
8192 bytes (413), at most 256 stored requests (429).

``list``: as root, print ``{"records": [{"file", "owner", "size", "text"}]}`` of what is stored
(regular files only, never followed through a link). Either takes the directory as a second
argument (default ``/var/lib/avm-requests``).
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import secrets
import socket
import stat
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

DIR = "/var/lib/avm-requests"
MAX_BODY = 8192
MAX_STORED = 256
_IDENTITY = re.compile(r"^profile:[a-z0-9][a-z0-9._-]{0,62}$")


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "avm-requests"
    sys_version = ""
    timeout = 5

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, doc: dict[str, object]) -> None:
        data = json.dumps(doc, sort_keys=True).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        identity = self.headers.get("x-avm-identity", "")
        if self.path != "/requests" or not _IDENTITY.fullmatch(identity):
            self._reply(400, {"error": "not a request the gateway forwarded"})
            return
        try:
            size = int(self.headers.get("content-length", ""))
        except ValueError:
            self._reply(411, {"error": "content-length required"})
            return
        if not 0 < size <= MAX_BODY:
            self._reply(413, {"error": f"a request body is 1-{MAX_BODY} bytes"})
            return
        body = self.rfile.read(size)
        if len([n for n in os.listdir(self.server.store) if n.endswith(".json")]) >= MAX_STORED:
            self._reply(429, {"error": "too many requests are waiting for a decision"})
            return
        rid = "rq-" + secrets.token_hex(8)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        record = {"id": rid, "identity": identity, "received": now, "body": body.decode("utf-8", "replace")}
        tmp = os.path.join(self.server.store, f".{rid}.tmp")
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(record, fh, sort_keys=True)
        os.chmod(tmp, 0o640)
        os.rename(tmp, os.path.join(self.server.store, f"{rid}.json"))
        self._reply(
            202,
            {
                "request": rid,
                "status": "pending",
                "note": "recorded; a human decides. GET http://avm.boundary/policy shows what is in force",
            },
        )


class Server(HTTPServer):
    address_family = socket.AF_UNIX  # the unit allows no other (RestrictAddressFamilies=AF_UNIX)
    store = DIR


def serve(store: str) -> None:
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("avm-requests: expected exactly one socket from systemd (avm-requests.socket)")
    server = Server(("", 0), Handler, bind_and_activate=False)  # the address is unused: fd 3 is the socket
    server.store = store
    server.socket.close()
    server.socket = socket.socket(fileno=3)
    server.serve_forever()


def listing(store: str) -> None:
    records = []
    for name in sorted(os.listdir(store)) if os.path.isdir(store) else []:
        path = os.path.join(store, name)
        st = os.lstat(path)
        if not name.endswith(".json") or not stat.S_ISREG(st.st_mode):
            continue
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
            raw = fh.read(4 * MAX_BODY + 1)
        text = raw.decode("utf-8", "replace") if len(raw) <= 4 * MAX_BODY else None
        records.append({"file": name, "owner": owner, "size": st.st_size, "text": text})
    print(json.dumps({"records": records}, sort_keys=True))


if __name__ == "__main__":
    where = sys.argv[2] if len(sys.argv) > 2 else DIR
    serve(where) if sys.argv[1:2] == ["serve"] else listing(where)
