"""A small HTTP backend for the HAProxy tests: answers its own name, and heartbeats.

python tests/apps/http_backend.py NAME PORT   (HBBUS_* settings from the environment)
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hbbus.client import SyncHeartbeater


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    interval_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    beat = SyncHeartbeater(
        "web",
        name,
        interval_s=interval_s,
        misses=3,
        meta={"endpoint": f"127.0.0.1:{port}", "haproxy": f"web/{name}"},
    )
    beat.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    stop.wait()
    server.shutdown()
    beat.stop()


if __name__ == "__main__":
    main()
