"""The worker's ops endpoints, /metrics (Prometheus) and /healthz (503 while the event
loop has not ticked for `worker.stuck_after_s`), served on a thread of their own."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from puller.worker import Worker


class OpsServer:
    """/metrics and /healthz on a thread of their own, so a stuck event loop is visible."""

    def __init__(self, worker: Worker, *, host: str, port: int) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _ops_handler(worker))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _ops_handler(worker: Worker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, worker.metrics.render(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                age_s = worker.heartbeat.age_s()
                stuck_after_s = worker.config.worker.stuck_after_s
                if age_s > stuck_after_s:
                    body = f"unhealthy: event loop has not ticked for {age_s:.0f}s\n"
                    self._send(503, body.encode(), "text/plain")
                else:
                    self._send(200, b"ok\n", "text/plain")
            else:
                self._send(404, b"try /metrics or /healthz\n", "text/plain")

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
