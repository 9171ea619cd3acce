#!/usr/bin/env python3
"""An OTLP/HTTP sink for the tracing scenario: it answers every export with 200, as a
collector that keeps up does, and counts what it was sent (standard library only).

    python3 bench/otlp_sink.py PORT     # GET /stats: {"path": [exports, bytes], ...}
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

counts: dict[str, list[int]] = {}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        size = int(self.headers.get("content-length") or 0)
        self.rfile.read(size)
        with lock:
            seen = counts.setdefault(self.path, [0, 0])
            seen[0] += 1
            seen[1] += size
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        with lock:
            body = json.dumps(counts).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
