"""Poll a profile's health endpoint on the host: ``python3 -c <this file> PORT PATH COMMIT TIMEOUT``.

Health means the service answers on ``http://127.0.0.1:PORT/PATH`` and reports ``COMMIT`` in its
JSON body, not that a symlink points at it. Prints the body (exit 0) once it does, or
``{"error": <last failure>}`` (exit 1) when ``TIMEOUT`` seconds pass first.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def main() -> None:
    port, path, commit = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    deadline = time.time() + float(sys.argv[4])
    last = "no answer"
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                body = json.loads(r.read())
            if body.get("commit") == commit:
                print(json.dumps(body))
                sys.exit(0)
            last = f"reports commit {body.get('commit')}"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    print(json.dumps({"error": last}))
    sys.exit(1)


if __name__ == "__main__":
    main()
