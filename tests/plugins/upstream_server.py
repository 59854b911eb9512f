"""A test HTTPS upstream (``api.example.test``): answers every request with what it received.

``USAGE`` paths also carry a usage object (OpenAI or Anthropic style) and ``/v1/messages`` with
``"stream": true`` answers as an event stream, so the gateway's token counts can be checked.

Run as ``python -m tests.plugins.upstream_server ADDR PORT CERT KEY LOG [--redact] [--also NAME CERT
KEY]`` inside the
namespace a test made; each request is also appended to LOG as one JSON line, so a test can prove
what reached the upstream (and that nothing did). ``--redact`` answers credential headers as
their sha256 only (LOG keeps them whole), so a guest's outputs can be swept for the secret.
Prints ``ready`` once it listens.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import ssl
import sys
from typing import Any

CREDENTIAL_HEADERS = ("x-api-key", "authorization")
# paths answered with a usage object, as the two API styles report tokens (input: the request
# body's length, so each request's count is known to the test; output: fixed)
USAGE = {
    "/v1/chat/completions": lambda n: {"prompt_tokens": n, "completion_tokens": 7, "total_tokens": n + 7},
    "/v1/messages": lambda n: {"input_tokens": n, "output_tokens": 5},
}
STREAMED = ("/v1/messages",)  # with "stream": true in the body: an event stream
STREAM_OUTPUT = 42


class Echo(http.server.BaseHTTPRequestHandler):
    log_path = ""
    redact = False
    protocol_version = "HTTP/1.1"  # keep-alive, as a real API: the bench compares like with like
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

    def _reply(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        seen: dict[str, Any] = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode(errors="replace"),
        }
        with open(self.log_path, "a") as log:
            log.write(json.dumps(seen) + "\n")
        shown = dict(seen)
        if self.redact:
            shown["headers"] = [
                [k, "sha256:" + hashlib.sha256(v.encode()).hexdigest() if k in CREDENTIAL_HEADERS else v]
                for k, v in seen["headers"]
            ]
        if self.path.split("?")[0] in STREAMED and b'"stream": true' in body:
            self._stream(body)
            return
        usage = USAGE.get(self.path.split("?")[0])
        if usage is not None:  # last, as real APIs put it: after the echoed body
            shown["usage"] = usage(len(body))
        out = json.dumps(shown).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-avm-budget", "requests")  # forged: the gateway must strip it
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def _stream(self, body: bytes) -> None:
        """An Anthropic-style event stream: the input count first, the final output count last."""
        events = [
            ("message_start", {"message": {"usage": {"input_tokens": len(body), "output_tokens": 1}}}),
            ("content_block_delta", {"delta": {"text": "x" * 300}}),
            ("message_delta", {"usage": {"output_tokens": STREAM_OUTPUT}}),
        ]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for name, data in events:
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    addr, port, cert, key, log = sys.argv[1:6]
    Echo.log_path = log
    Echo.redact = "--redact" in sys.argv[6:]
    server = http.server.ThreadingHTTPServer((addr, int(port)), Echo)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    # --also NAME CERT KEY: a second name served by its own leaf (chosen by SNI)
    extra = sys.argv.index("--also") if "--also" in sys.argv else None
    if extra is not None:
        name, cert2, key2 = sys.argv[extra + 1 : extra + 4]
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        other.load_cert_chain(cert2, key2)

        def pick(sock: ssl.SSLObject, sni: str, _ctx: ssl.SSLContext) -> None:
            if sni == name:
                sock.context = other

        ctx.sni_callback = pick
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
