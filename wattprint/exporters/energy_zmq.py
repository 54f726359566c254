"""The middleware's lookup over ZeroMQ: a ``DEALER`` socket in the server's event loop, connected to the
sidecar's lookup socket (:mod:`wattprint.profiler.sidecar.lookup`). A question is one non-blocking send;
a reader on the socket's descriptor (``loop.add_reader``) hands each answer to the question that waits
for it (by number), so that questions from concurrent answers are pipelined on one connection, with no
thread hop and no connection per answer.

* The socket is connected only when its directory is a private one of ours
  (:func:`~wattprint.profiler.sidecar.paths.is_private_dir`): no other user can have put a socket there.
* ``IMMEDIATE``: while no sidecar is connected, a send fails at once instead of queueing; the question
  then goes to ``fallback`` (the HTTP lookup, counted ``fallback``), else it fails (counted, see
  :class:`~wattprint.exporters.energy_client.Lookup`: the answer says ``unavailable``).
* Memory: at most ``max_in_flight`` questions wait (the rest are skipped); an answer to a question that
  timed out is dropped; ZeroMQ's high-water marks bound its queues.
* A new event loop (a test's ``asyncio.run``) gets a new socket.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec
import zmq

from wattprint.exporters.energy_client import MAX_RECORD_BYTES, Lookup
from wattprint.profiler.sidecar import paths
from wattprint.profiler.sidecar.lookup import Question

log = logging.getLogger(__name__)

_CONNECT_POLL_S = 0.001


class _Reply(msgspec.Struct, array_like=True):
    n: int
    code: int
    record: dict | None = None


class ZmqLookup(Lookup):
    """Questions to ``address`` (``ipc://PATH``); see the module docstring."""

    def __init__(self, address: str, *, fallback: Lookup | None = None, **kwargs):
        super().__init__(**kwargs)
        if not address.startswith("ipc://"):
            raise ValueError(f"the sidecar's lookup socket must be ipc://PATH, got {address!r}")
        self.address, self.fallback = address, fallback
        self.socket_dir = os.path.dirname(address[len("ipc://"):])
        self.counts.update(fallback=0, bad_answer=0)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(_Reply)
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._n = 0
        self._connected_t = 0.0

    # -------------------------------------------------------------------------------- connection
    def _connect(self, loop: asyncio.AbstractEventLoop) -> zmq.Socket | None:
        """The socket of ``loop`` (connected on first use); None while its directory is not private."""
        if self._loop is loop and self._sock is not None:
            return self._sock
        self._disconnect()
        if not paths.is_private_dir(self.socket_dir):
            return None
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.MAXMSGSIZE, MAX_RECORD_BYTES),
                           (zmq.SNDHWM, 4 * self.max_in_flight), (zmq.RCVHWM, 4 * self.max_in_flight)):
            sock.setsockopt(opt, value)
        sock.connect(self.address)
        loop.add_reader(sock.getsockopt(zmq.FD), self._on_readable)
        self._sock, self._loop, self._connected_t = sock, loop, loop.time()
        return sock

    def _disconnect(self) -> None:
        sock, loop, self._sock, self._loop = self._sock, self._loop, None, None
        self._pending.clear()
        if sock is None:
            return
        try:
            loop.remove_reader(sock.getsockopt(zmq.FD))
        except Exception:  # noqa: BLE001 - a closed event loop: nothing left to clean up there
            log.debug("wattprint middleware: closing the lookup socket", exc_info=True)
        sock.close(0)

    def _on_readable(self) -> None:
        """Hands each answer waiting to its question (ZeroMQ's descriptor is edge-triggered: read until
        ``EVENTS`` says there is nothing left)."""
        sock = self._sock
        while sock is not None and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            try:
                reply = self._decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.counts["bad_answer"] += 1
                continue
            fut = self._pending.pop(reply.n, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    # ---------------------------------------------------------------------------------- questions
    async def _send(self, loop, response_id: str, ref: str, sig: str) -> int | None:
        """Send one question; its number, or None when no sidecar is connected (just after connecting,
        the connection is waited for, within ``timeout_s``)."""
        sock = self._connect(loop)
        if sock is None:
            return None
        self._n += 1
        n = self._n
        frame = self._encoder.encode(Question(n, response_id, ref, sig))
        while True:
            try:
                sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:  # no peer connected (IMMEDIATE), or its queue is full
                if loop.time() + _CONNECT_POLL_S > self._connected_t + self.timeout_s:
                    return None
                await asyncio.sleep(_CONNECT_POLL_S)
        self._pending[n] = loop.create_future()
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # reading EVENTS may have taken the descriptor's edge
            loop.call_soon(self._on_readable)
        return n

    async def ask(self, response_id: str, ref: str, sig: str) -> dict | None:
        loop = asyncio.get_running_loop()
        n = await self._send(loop, response_id, ref, sig)
        if n is None:
            if self.fallback is None:
                raise OSError(f"no sidecar on {self.address}")
            self.counts["fallback"] += 1
            return await self.fallback.ask(response_id, ref, sig)
        fut = self._pending[n]
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await fut
        finally:
            self._pending.pop(n, None)
        if reply.code == 404:
            return None
        if reply.code != 200 or reply.record is None:
            raise OSError(f"sidecar answered {reply.code}")
        return reply.record

    def close(self) -> None:
        self._disconnect()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.fallback is not None:
            self.fallback.close()
