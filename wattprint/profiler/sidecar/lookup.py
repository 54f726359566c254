"""The sidecar's lookup socket: the HTTP middleware asks for the records of the answers it is sending over
ZeroMQ (its ``DEALER`` to this ``ROUTER``) instead of one HTTP request through a server thread each.

* **Where**: ``ipc://<step socket>.lookup`` (:func:`lookup_address`), beside the step socket in the same
  private directory (0700, ours: :mod:`~wattprint.profiler.sidecar.paths`), the socket file 0600. Only
  this user's processes can connect; a step socket on ``tcp://`` gets no lookup socket (the HTTP API
  serves instead).
* **Credential**: each question carries the signed URL's reference and signature, checked by the same
  rule as the HTTP API (:class:`~wattprint.profiler.sidecar.httpapi.RequestAccess`): a peer learns
  nothing it could not read at the request's URL.
* **Wire** (msgpack, one frame each way): question ``[n, response_id, ref, sig]``, answer
  ``[n, code, record]`` where ``n`` is the asker's number for the question, ``code`` the HTTP status the
  API would give (200, 403, 404) and ``record`` the record (a map, as ``GET /v1/requests/{id}`` gives
  it) or nil. Questions that are not this (too large, undecodable, too many frames) get no answer and are
  counted (``wattprint_internal_errors_total{where="lookup_bad_question"}``).
* **Batches**: the thread answers every question waiting (at most ``max_batch``) under one acquisition
  of the sidecar's lock. Answers that cannot be sent at once (the asker gone, or not reading) are dropped
  and counted (``lookup_unsent``); ZeroMQ's high-water marks bound what is queued either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable

import msgspec
import zmq

from wattprint.errors import ConfigError
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.transport.receiver import remove_stale_socket

log = logging.getLogger(__name__)

LOOKUP_SUFFIX = ".lookup"
MAX_QUESTION_BYTES = 2048
MAX_ID_CHARS = 512
HWM = 10_000  # questions (and answers) queued per peer before ZeroMQ refuses more


class Question(msgspec.Struct, array_like=True, frozen=True):
    n: int
    response_id: str
    ref: str
    sig: str


class Answer(msgspec.Struct, array_like=True):
    n: int
    code: int
    record: RequestResult | None = None


def lookup_address(step_address: str | None) -> str | None:
    """The lookup socket beside an ``ipc://`` step socket (None for any other address)."""
    if not step_address or not step_address.startswith("ipc://"):
        return None
    return step_address + LOOKUP_SUFFIX


AccessFn = Callable[[str, dict, "str | None"], "tuple[int, RequestResult | dict]"]


class LookupServer:
    """The ``ROUTER`` on a thread (see the module docstring). ``access(id, {"ref", "sig"}, None)`` is the
    HTTP API's ``requests_fn``; it is called with ``lock`` held, once per batch. ``stats``: the
    sidecar's :class:`~wattprint.profiler.sidecar.stats.Counters`."""

    def __init__(self, address: str, access: AccessFn, lock, stats, *, max_batch: int = 256,
                 poll_ms: int = 200):
        if not address.startswith("ipc://"):
            raise ConfigError(f"the lookup socket must be ipc://PATH, got {address!r}")
        self.address, self.socket_file = address, address[len("ipc://"):]
        self.access, self.lock, self.stats = access, lock, stats
        self.max_batch, self.poll_ms = max(1, max_batch), poll_ms
        self.counts = {"questions": 0, "answered": 0}
        self._decoder = msgspec.msgpack.Decoder(Question)
        self._encoder = msgspec.msgpack.Encoder()
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None
        self._sock = None
        self._thread: threading.Thread | None = None

    def bind(self) -> LookupServer:
        """Bind the socket file (0600) in its directory (which must exist: the step socket's)."""
        remove_stale_socket(self.socket_file)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        for opt, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, MAX_QUESTION_BYTES), (zmq.RCVHWM, HWM),
                           (zmq.SNDHWM, HWM), (zmq.ROUTER_MANDATORY, 1)):
            sock.setsockopt(opt, value)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            self._ctx.term()
            self._ctx = None
            raise ConfigError(f"cannot bind the lookup socket {self.address}: {exc}") from exc
        os.chmod(self.socket_file, 0o600)
        self._sock = sock
        return self

    def start(self) -> LookupServer:
        self._thread = threading.Thread(target=self._loop, name="wattprint-lookup", daemon=True)
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop answering, close the socket and remove its file. Idempotent."""
        self._stop.set()
        thread, ctx, bound = self._thread, self._ctx, self._sock is not None
        self._thread = self._ctx = None
        if thread is not None:
            thread.join(timeout=5)  # the thread closes the socket
        elif bound:
            self._sock.close(0)
        self._sock = None
        if ctx is not None:
            ctx.term()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_file)

    def _loop(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set():
                try:
                    if not sock.poll(self.poll_ms, zmq.POLLIN):
                        continue
                    self._answer(self._drain(sock), sock)
                except Exception:  # noqa: BLE001 - the thread must survive anything
                    self.stats.fail("lookup", "lookup socket error")
        finally:
            sock.close(0)

    def _drain(self, sock) -> list[tuple[bytes, Question]]:
        """The questions waiting (at most ``max_batch``), decoded; bad ones counted."""
        out = []
        for _ in range(self.max_batch):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                if len(frames) != 2:
                    raise msgspec.ValidationError("expected one frame")
                q = self._decoder.decode(frames[1])
                if len(q.response_id) > MAX_ID_CHARS or not q.response_id:
                    raise msgspec.ValidationError("bad response id")
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.stats.count_error("lookup_bad_question")
                continue
            out.append((frames[0], q))
        return out

    def _answer(self, batch: list[tuple[bytes, Question]], sock) -> None:
        if not batch:
            return
        answers = []
        with self.lock:
            for peer, q in batch:
                code, result = self.access(q.response_id, {"ref": q.ref, "sig": q.sig}, None)
                record = result if code == 200 and isinstance(result, RequestResult) else None
                answers.append((peer, Answer(q.n, code, record)))
        self.counts["questions"] += len(batch)
        for peer, a in answers:
            try:
                sock.send_multipart([peer, self._encoder.encode(a)], zmq.NOBLOCK)
                self.counts["answered"] += 1
            except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH) or not reading (EAGAIN)
                self.stats.count_error("lookup_unsent")
