"""The controller's HTTP endpoints: /metrics (Prometheus text), /healthz and /readyz.

/healthz: the process and its scheduler run. /readyz: the config loaded and a cycle finished
recently without a cluster error (a standby replica that observes is ready too).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def serve(
    address: tuple[str, int],
    registry: CollectorRegistry,
    healthy: Callable[[], tuple[bool, dict]],
    ready: Callable[[], tuple[bool, dict]],
) -> ThreadingHTTPServer:
    """Start the endpoints in a daemon thread; returns the server (`.server_address` has the
    bound port, `.shutdown()` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                return
            check = {"/healthz": healthy, "/readyz": ready}.get(path)
            if check is None:
                self._send(404, b'{"error": "not found"}', "application/json")
                return
            ok, detail = check()
            body = json.dumps({"ok": ok, **detail}).encode()
            self._send(200 if ok else 503, body, "application/json")

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="controller-http", daemon=True).start()
    return server
