"""A plain-HTTP stand-in classifier that records what the gateway's check request carried.

Run as ``python -m tests.plugins.verdict_recorder ADDR PORT LOG [--no-verdict]`` inside the
gateway's namespace. Every check request is one JSON line in LOG (method, path, headers, body);
the answer is a public verdict, or with ``--no-verdict`` a 200 without any verdict header (a
classifier that does not speak the protocol). Used only to prove what Envoy sends a classifier
(no header of the agent's, no injected credential) and what it does with an answer without a
level; never to stand in for the reference classifier's verdicts.
"""

from __future__ import annotations

import http.server
import json
import sys


class Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_path = ""
    verdict = True

    def _answer(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode(errors="replace"),
        }
        with open(self.log_path, "a") as log:
            log.write(json.dumps(seen) + "\n")
        self.send_response(200)
        self.send_header("content-length", "0")
        if self.verdict:
            self.send_header("x-avm-sensitivity", "public")
            self.send_header("x-avm-findings", "-")
            self.send_header("x-avm-classifier", "recorder@0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    addr, port, log = sys.argv[1:4]
    Recorder.log_path = log
    Recorder.verdict = "--no-verdict" not in sys.argv[4:]
    server = http.server.ThreadingHTTPServer((addr, int(port)), Recorder)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
