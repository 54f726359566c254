"""The sidecar's small HTTP server: a WSGI server with a bounded pool of worker threads (a scrape never
blocks the sidecar's receive loop, and no number of connections makes it start more threads) serving:

* ``GET /metrics`` - Prometheus text or OpenMetrics (with exemplars), by content negotiation
  (``Accept: application/openmetrics-text``), exactly as ``prometheus_client.make_wsgi_app``;
* ``GET /v1/requests/{id}`` - one request's energy as JSON: 404 ``{"error": ...}`` while unknown,
  ``{"status": "provisional", ...}`` while in flight or not yet settled, then the final record. With
  ``requests_fn`` (the sidecar's), access is checked: 401 without a credential, 403 with a wrong one
  (:mod:`wattprint.profiler.sidecar.access`);
* ``GET /healthz`` - 200 ``{"status": "ok", ...}``, or 503 when the sidecar is not healthy;
* ``GET /openapi.json`` - the OpenAPI description of these routes, when one is given.

Connections beyond the pool and its short queue are answered 503 at once and closed; a client must send
its whole request within ``request_deadline_s`` (each read waits at most ``read_timeout_s``), so that
half-open or trickling connections hold a worker for a bounded time.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs
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


RequestsFn = Callable[[str, dict, "str | None"], "tuple[int, RequestResult | dict]"]
_REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 500: "Internal Server Error"}


def make_app(
    registry: CollectorRegistry,
    lookup_fn: Callable[[str], RequestResult | None] | None = None,
    health_fn: Callable[[], tuple[bool, dict]] | None = None,
    *,
    requests_fn: RequestsFn | None = None,
    openapi: dict | None = None,
):
    """The sidecar's WSGI application (``/metrics``, ``/v1/requests/{id}``, ``/healthz``, ``/openapi.json``).

    ``lookup_fn(id)`` serves records to anyone; ``requests_fn(id, query, authorization)`` (which wins)
    decides access itself and returns ``(HTTP status, result or error dict)``."""
    metrics_app = make_wsgi_app(registry)
    openapi_body = json.dumps(openapi).encode() if openapi is not None else None
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
        if path == "/openapi.json" and openapi_body is not None:
            return respond("200 OK", openapi_body)
        if path.startswith(prefix) and (lookup_fn is not None or requests_fn is not None):
            # PEP 3333: PATH_INFO is already percent-decoded, its bytes carried as latin-1
            rid = path[len(prefix):]
            try:
                rid = rid.encode("latin-1").decode("utf-8")
            except UnicodeError:
                pass
            if not rid:
                return respond("404 Not Found", {"error": "no request id given"})
            try:
                if requests_fn is not None:
                    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING") or "").items()}
                    code, result = requests_fn(rid, query, environ.get("HTTP_AUTHORIZATION"))
                    if code != 200 or isinstance(result, dict):
                        body = result if isinstance(result, dict) else {"error": "not found"}
                        return respond(f"{code} {_REASONS.get(code, 'Error')}", body)
                else:
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


class _DeadlineSocket(io.RawIOBase):
    """A socket read with a per-read timeout and a deadline for the whole request."""

    def __init__(self, sock: socket.socket, read_timeout_s: float, deadline: float):
        self.sock, self.read_timeout_s, self.deadline = sock, read_timeout_s, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self.sock.settimeout(min(self.read_timeout_s, left))
        return self.sock.recv_into(b)


class _SilentHandler(WSGIRequestHandler):
    read_timeout_s = 2.0
    request_deadline_s = 5.0

    def setup(self):
        super().setup()
        self.connection.settimeout(self.read_timeout_s)
        raw = _DeadlineSocket(self.connection, self.read_timeout_s, time.monotonic() + self.request_deadline_s)
        self.rfile = io.BufferedReader(raw, 8192)

    def handle(self):
        try:
            super().handle()
        except (TimeoutError, OSError):
            pass

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass


class _PoolWSGIServer(WSGIServer):
    """Connections are handled by at most ``workers`` threads; at most ``backlog`` more wait, the rest
    get 503 at once."""

    allow_reuse_address = True
    request_queue_size = 128  # the listen backlog: connections are accepted (and refused) quickly
    workers = 8
    backlog = 32

    def server_activate(self):
        super().server_activate()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="wattprint-http")
        self._slots = threading.BoundedSemaphore(self.workers + self.backlog)
        self.rejected = 0

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.rejected += 1
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            self._pool.submit(self._work, request, client_address)
        except RuntimeError:  # shutting down
            self._slots.release()
            self.shutdown_request(request)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("HTTP request from %s failed", client_address, exc_info=True)

    def server_close(self):
        super().server_close()
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class MetricsServer:
    """A WSGI server with a bounded worker pool (see the module docstring), accepting on a daemon
    thread. ``port=0`` binds an ephemeral port (see ``.port``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 9464, *, workers: int = 8,
                 read_timeout_s: float = 2.0, request_deadline_s: float = 5.0):
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]

        class Server(_PoolWSGIServer):
            address_family = family

        Server.workers = max(1, workers)

        class Handler(_SilentHandler):
            pass

        Handler.read_timeout_s, Handler.request_deadline_s = read_timeout_s, request_deadline_s
        self._httpd = make_server(sockaddr[0], port, app, Server, handler_class=Handler)
        self.host = sockaddr[0]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="wattprint-http", daemon=True)

    @property
    def rejected(self) -> int:
        """Connections answered 503 because the pool and its queue were full."""
        return self._httpd.rejected
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
