"""ASGI middleware for vLLM's OpenAI-compatible server: tells each client where its energy will be.

Use it with ``vllm serve ... --middleware wattprint.exporters.http.WattprintMiddleware``. It is a pure
ASGI middleware (Starlette style, no Starlette import). For ``POST /v1/completions`` and
``POST /v1/chat/completions`` it:

* adds ``X-Wattprint-Request-Id``: the OpenAI response id the request will get (``chatcmpl-<X>`` or
  ``cmpl-<X>``), and ``X-Wattprint-Energy-Url``: the sidecar's ``/v1/requests/<that id>``, which answers
  404 until the sidecar has seen the request, ``{"status": "provisional", ...}`` while it runs and the
  final record once its energy windows are settled (a few seconds after it finishes).
  The id is known without reading the response: vLLM builds it from the ``X-Request-Id`` request header
  (else the body's ``request_id``, else a random uuid). The middleware therefore sets ``X-Request-Id``
  to a fresh uuid when neither is present. The sidecar maps vLLM's engine ids (``<id>-<8 hex>``,
  ``cmpl-<X>-<prompt index>-...``) back to the response id (the formats:
  :mod:`wattprint.profiler.vllm.ids`). Clients that bypass the middleware can
  look their energy up with the ``id`` field of any response: ``GET <sidecar>/v1/requests/<id>``.
* copies an ``X-Wattprint-Stratum`` request header into the JSON body as ``vllm_xargs.stratum`` when
  the body does not set one (the engine hook reads it from the sampling params' ``extra_args``).

The sidecar's base URL comes from ``WATTPRINT_ENERGY_URL`` (default ``http://127.0.0.1:9464``): the
*public* base clients can reach (``wattprint serve --public-url``), not necessarily the sidecar's bind.

Per-request credential (:mod:`wattprint.profiler.sidecar.access`): each request gets a fresh random
reference, written into the body as ``vllm_xargs.wattprint_ref`` (a client's own value is replaced) and
carried by the engine hook's records; the energy URL is
``<base>/v1/requests/<response id>?ref=<ref>&sig=<HMAC>``, signed with the key the sidecar shares
(``WATTPRINT_URL_KEY``, ``WATTPRINT_URL_KEY_FILE``, else ``url.key`` beside the sidecar's socket). Two
requests with the same ``X-Request-Id`` get different URLs, each leading to its own record; without
a key no energy URL is named (the response id header is still added).

Energy in the answer (:mod:`wattprint.exporters.answer_send`): a non-streaming completion gets the
request's figure as ``X-Wattprint-Energy-J``, ``-Prefill-J``, ``-Decode-J``, ``-KV-J``,
``X-Wattprint-Energy-Status`` (``provisional`` | ``final`` | ``unavailable``), ``X-Wattprint-Source``,
``X-Wattprint-Class`` and as ``usage.energy`` in the body; a stream carries it in its usage chunk, or as
``: energy {...}`` before ``data: [DONE]``. The figure is the sidecar's record at answer time, looked up
over ZeroMQ on the sidecar's private lookup socket (``WATTPRINT_LOOKUP``, default: ``<the sidecar's
ipc socket>.lookup``; ``http``: not at all), in the event loop, falling back to a ``GET`` at
``WATTPRINT_SIDECAR_URL`` (default: the energy URL's base) while no sidecar listens there, each with a
short timeout (:mod:`wattprint.exporters.energy_client`; ``WATTPRINT_ENERGY_TIMEOUT_MS``, default 50, and
``WATTPRINT_ENERGY_WAIT_MS``, default 0: how long to wait for the request's last steps to reach the
sidecar). A sidecar that is down or slow makes the status ``unavailable`` and changes nothing else.
``WATTPRINT_ANSWER_ENERGY=0`` turns this off.

Access policy (:mod:`wattprint.exporters.policy_gate`, installed by ``wattprint serve --policy FILE``
through ``WATTPRINT_POLICY``): the request's stratum (its ``vllm_xargs.stratum``, else the
``X-Wattprint-Stratum`` header) is checked against its API key and written into the body; a request of a
stratum over its conditions is answered 429 with ``Retry-After`` before the engine sees it (``reject``),
flagged ``X-Wattprint-Policy: breach`` (``observe``) or given a worse ``priority`` (``deprioritize``).

It never breaks a request: any exception of its own leaves the request and response untouched
(a body it had already read is replayed as it was), exceptions of the application propagate as they
are, and responses (streaming included) pass through message by message, only the start message
gaining two headers. Bodies over ``max_body_bytes`` are passed through without a stratum rewrite.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

from wattprint.exporters import answer
from wattprint.exporters.answer_send import energy_send
from wattprint.exporters.energy_client import ENV_TIMEOUT_MS, ENV_WAIT_MS, EnergyLookup, Lookup
from wattprint.exporters.energy_zmq import ZmqLookup
from wattprint.exporters.policy_gate import PolicyGate, Verdict
from wattprint.profiler.sidecar import access
from wattprint.profiler.sidecar.lookup import lookup_address
from wattprint.profiler.transport.messages import ENV_SIDECAR, address, runtime_dir
from wattprint.profiler.vllm.ids import RESPONSE_ID_PREFIXES

log = logging.getLogger(__name__)

ENV_ENERGY_URL = "WATTPRINT_ENERGY_URL"
ENV_SIDECAR_URL = "WATTPRINT_SIDECAR_URL"
ENV_ANSWER_ENERGY = "WATTPRINT_ANSWER_ENERGY"
ENV_LOOKUP = "WATTPRINT_LOOKUP"
DEFAULT_ENERGY_URL = "http://127.0.0.1:9464"
HEADER_REQUEST_ID = b"x-wattprint-request-id"
HEADER_ENERGY_URL = b"x-wattprint-energy-url"
HEADER_STRATUM = b"x-wattprint-stratum"
MAX_BODY_BYTES = 16 << 20
_MAX_ID_CHARS = 256


class _PassThrough(Exception):
    """Give up on this request: replay what was read and let it through untouched."""


def _header(headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def _replaying_receive(messages: list, receive):
    """A ``receive`` that returns ``messages`` first, then defers to the original ``receive``."""
    pending = list(messages)

    async def replay():
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class WattprintMiddleware:
    """Pure ASGI middleware: energy headers and ``X-Wattprint-Stratum`` -> ``vllm_xargs.stratum``."""

    def __init__(self, app, energy_base_url: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 url_key: bytes | None = None, gate: PolicyGate | None = None, lookup: Lookup | None = None):
        self.app = app
        self.energy_base_url = (energy_base_url or os.environ.get(ENV_ENERGY_URL) or DEFAULT_ENERGY_URL).rstrip("/")
        self.max_body_bytes = max_body_bytes
        self.url_key = url_key if url_key is not None else _key_from_environment()
        self.gate = gate if gate is not None else PolicyGate.from_env()  # a bad policy file stops the server
        self.lookup = lookup if lookup is not None else _lookup_from_environment(self.energy_base_url)

    async def __call__(self, scope, receive, send):
        try:
            prefix = self._applies(scope)
        except Exception:  # noqa: BLE001 - ours: pass through
            prefix = None
        if prefix is None:
            await self.app(scope, receive, send)
            return
        consumed: list = []
        try:
            scope2, receive2, (response_id, ref, verdict) = await self._prepare(scope, receive, consumed, prefix)
            if verdict is not None and not verdict.decision.admitted:
                for message in self.gate.rejection(verdict):  # 429 before the engine sees the request
                    await send(message)
                return
            send2 = self._wrap_send(send, response_id, ref, verdict)
        except Exception as exc:  # noqa: BLE001 - ours (including _PassThrough): untouched
            if not isinstance(exc, _PassThrough):
                log.debug("wattprint middleware: passing a request through untouched", exc_info=True)
            scope2, receive2, send2 = scope, _replaying_receive(consumed, receive), send
        await self.app(scope2, receive2, send2)

    # --------------------------------------------------------------------------------------- request
    @staticmethod
    def _applies(scope) -> str | None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return None
        path = scope.get("path") or ""
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        return RESPONSE_ID_PREFIXES.get(path)

    async def _prepare(self, scope, receive, consumed: list, prefix: str):
        """Read the body, decide the response id, rewrite the stratum. Returns (scope, receive, id)."""
        headers = list(scope.get("headers") or [])
        body = bytearray()
        while True:
            message = await receive()
            consumed.append(message)
            if message.get("type") != "http.request":
                raise _PassThrough  # a disconnect while reading: let the application see it
            body += message.get("body", b"") or b""
            if len(body) > self.max_body_bytes:
                raise _PassThrough
            if not message.get("more_body", False):
                break

        dirty = False  # the body is re-encoded once, whatever changed
        try:
            data = json.loads(bytes(body))
        except ValueError:
            data = None  # vLLM will answer 400; still tell the client nothing misleading below
        header_rid = _header(headers, b"x-request-id")
        if header_rid is not None:
            base = header_rid.decode("latin-1")
        elif isinstance(data, dict) and isinstance(data.get("request_id"), str) and data["request_id"]:
            base = data["request_id"]
        else:
            base = uuid.uuid4().hex
            headers.append((b"x-request-id", base.encode("latin-1")))

        stratum = _header(headers, HEADER_STRATUM)
        xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
        usable = isinstance(data, dict) and (xargs is None or isinstance(xargs, dict))
        verdict = None
        if self.gate is not None and usable:
            claim = xargs["stratum"] if xargs is not None and "stratum" in xargs else stratum
            verdict = self.gate.admit(_header(headers, b"authorization"), claim)
            self.gate.rewrite(data, verdict)
            dirty = True
        elif stratum is not None and usable:
            value = stratum.decode("latin-1").strip()
            if value and (xargs is None or "stratum" not in xargs):
                data["vllm_xargs"] = {**(xargs or {}), "stratum": value}
                dirty = True

        ref = None
        if usable and self.url_key is not None:
            ref = access.new_ref()
            data["vllm_xargs"] = {**(data.get("vllm_xargs") or {}), access.REF_ARG: ref}
            dirty = True

        new_body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") if dirty else None
        if new_body is not None:
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(new_body)).encode()))
            messages = [{"type": "http.request", "body": new_body, "more_body": False}]
        else:
            messages = [{"type": "http.request", "body": bytes(body), "more_body": False}]
        scope2 = dict(scope)
        scope2["headers"] = headers
        response_id = f"{prefix}{base}"
        if len(response_id) > _MAX_ID_CHARS or not (response_id.isascii() and response_id.isprintable()):
            response_id = None
        return scope2, _replaying_receive(messages, receive), (response_id, ref, verdict)

    # -------------------------------------------------------------------------------------- response
    def _wrap_send(self, send, response_id: str | None, ref: str | None = None, verdict: Verdict | None = None):
        if response_id is None:
            return send
        extra = [(HEADER_REQUEST_ID, response_id.encode("latin-1"))]
        url = sig = None
        if ref is not None:
            sig = access.sign(self.url_key, response_id, ref)
            url = self.energy_base_url + access.request_path(response_id, ref, sig)
            extra.append((HEADER_ENERGY_URL, url.encode("latin-1")))
        if verdict is not None:
            extra += verdict.headers()
        if self.lookup is None:
            return _with_headers(send, extra)
        lookup, gate = self.lookup, self.gate

        async def fetch(output_tokens: int | None) -> dict:
            record = await lookup.record(response_id, ref, sig, output_tokens) if sig is not None else None
            energy = answer.energy_of(record, url)
            if verdict is not None:  # the answer's joules (and its work's ideal, for min_class) to its stratum
                gate.charge(verdict.stratum, energy, record.get("ideal_j") if isinstance(record, dict) else None)
            return energy

        return energy_send(send, headers=extra, fetch=fetch, max_body_bytes=self.max_body_bytes)


def _with_headers(send, extra: list):
    """``send`` with ``extra`` headers on a 2xx start message."""

    async def send_with_headers(message):
        if message.get("type") == "http.response.start":
            try:
                status = int(message.get("status", 0))
                if 200 <= status < 300:
                    message = dict(message)
                    message["headers"] = list(message.get("headers") or []) + extra
            except Exception:  # noqa: BLE001 - ours: send the original
                log.debug("wattprint middleware: could not add headers", exc_info=True)
        await send(message)

    return send_with_headers


def _lookup_from_environment(energy_base_url: str) -> Lookup | None:
    """The sidecar lookup for energy in the answer (None when ``WATTPRINT_ANSWER_ENERGY=0``): over the
    lookup socket with the HTTP API as fallback, or the HTTP API alone (``WATTPRINT_LOOKUP=http``, or a
    sidecar socket that is not ``ipc://``)."""
    if os.environ.get(ENV_ANSWER_ENERGY, "1") == "0":
        return None
    try:
        kwargs = {"timeout_s": float(os.environ.get(ENV_TIMEOUT_MS, "50")) / 1000,
                  "wait_s": float(os.environ.get(ENV_WAIT_MS, "0")) / 1000}
        http = EnergyLookup(os.environ.get(ENV_SIDECAR_URL) or energy_base_url, **kwargs)
        where = os.environ.get(ENV_LOOKUP, "").strip()
        if where == "http":
            return http
        where = address(where) if where else lookup_address(address(os.environ.get(ENV_SIDECAR)))
        if where is None or not where.startswith("ipc://"):
            return http
        return ZmqLookup(where, fallback=http, **kwargs)
    except ValueError:
        log.warning("wattprint middleware: bad %s/%s/%s/%s: no energy in answers", ENV_LOOKUP, ENV_SIDECAR_URL,
                    ENV_TIMEOUT_MS, ENV_WAIT_MS, exc_info=True)
        return None


def _key_from_environment() -> bytes | None:
    """The URL key the environment names, else ``url.key`` beside the sidecar's socket (None: no key)."""
    sock = address(os.environ.get(ENV_SIDECAR))
    sock_dir = os.path.dirname(sock[len("ipc://"):]) if sock.startswith("ipc://") else runtime_dir()
    key = access.key_from_env(os.path.join(sock_dir, "url.key"))
    if key is None:
        log.warning("wattprint middleware: no URL key (%s, %s, or url.key beside the sidecar's socket): "
                    "answers name no energy URL", access.ENV_URL_KEY, access.ENV_URL_KEY_FILE)
    return key
