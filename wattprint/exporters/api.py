"""The sidecar's small HTTP server: a threaded WSGI server (one thread per connection, so a scrape
never blocks the sidecar's receive loop) serving:

* ``GET /metrics`` - Prometheus text or OpenMetrics (with exemplars), by content negotiation
  (``Accept: application/openmetrics-text``), exactly as ``prometheus_client.make_wsgi_app``;
* ``GET /v1/requests/{id}`` - one request's energy as JSON: 404 ``{"error": ...}`` while unknown,
  ``{"status": "provisional", ...}`` while in flight or not yet settled, then the final record;
* ``GET /healthz`` - 200 ``{"status": "ok", ...}``, or 503 when the sidecar is not healthy.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app

from wattprint.profiler.core.results import RequestResult

log = logging.getLogger(__name__)


def result_json(result: RequestResult) -> bytes:
    data = msgspec.structs.asdict(result)
    data["j_per_output_token"] = result.j_per_output_token
    return msgspec.json.encode(data)


def _json_response(start_response, status: str, body: bytes | dict, head: bool = False):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [] if head else [body]


def make_app(
    registry: CollectorRegistry,
    lookup_fn: Callable[[str], RequestResult | None] | None = None,
    health_fn: Callable[[], tuple[bool, dict]] | None = None,
):
    """The sidecar's WSGI application (``/metrics``, ``/v1/requests/{id}``, ``/healthz``)."""
    metrics_app = make_wsgi_app(registry)
    prefix = "/v1/requests/"

    def app(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics" or path == "/metrics/":
            return metrics_app(environ, start_response)
        head = method == "HEAD"

        def respond(status, body):
            return _json_response(start_response, status, body, head)

        if method not in ("GET", "HEAD"):
            return respond("405 Method Not Allowed", {"error": f"{method} not allowed"})
        if path.startswith(prefix) and lookup_fn is not None:
            # PEP 3333: PATH_INFO is already percent-decoded, its bytes carried as latin-1
            rid = path[len(prefix):]
            try:
                rid = rid.encode("latin-1").decode("utf-8")
            except UnicodeError:
                pass
            if not rid:
                return respond("404 Not Found", {"error": "no request id given"})
            try:
                result = lookup_fn(rid)
            except Exception:  # noqa: BLE001 - never let a lookup take the server down
                log.exception("request lookup failed for %r", rid)
                return respond("500 Internal Server Error", {"error": "lookup failed"})
            if result is None:
                return respond("404 Not Found", {
                    "error": f"unknown request id {rid!r}: not seen yet, or evicted from memory "
                             "(finished requests are also in the ledger)",
                    "id": rid,
                })
            return respond("200 OK", result_json(result))
        if path == "/healthz":
            ok, detail = (True, {}) if health_fn is None else health_fn()
            body = {"status": "ok" if ok else "unhealthy", **detail}
            return respond("200 OK" if ok else "503 Service Unavailable", body)
        return respond("404 Not Found", {"error": f"no route {path}"})

    return app


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    """A threaded WSGI server on a daemon thread. ``port=0`` binds an ephemeral port (see ``.port``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 9464):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]

        class Server(_ThreadingWSGIServer):
            address_family = family

        self._httpd = make_server(sockaddr[0], port, app, Server, handler_class=_SilentHandler)
        self.host = sockaddr[0]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wattprint-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
