"""The sending end of the wire: step records out on a ZeroMQ PUSH socket, never blocking the caller.

It knows ZeroMQ and the :mod:`~wattprint.profiler.transport.messages`, not the engine: the vLLM hook
hands it :class:`~wattprint.profiler.core.records.StepRecord` objects and its encoded Hello.

* Records go out at most ``BATCH_MAX`` to a :class:`~wattprint.profiler.transport.messages.Steps`
  message, sent with ``zmq.NOBLOCK``. The ZeroMQ queue holds ``SNDHWM`` = records bound //
  ``BATCH_MAX`` messages; a full queue drops the message and counts its records, and every ``Steps``
  carries the running count in ``dropped_total`` (with the records the caller lost before sending:
  :meth:`Sender.lost`).
* :class:`DirectSender` encodes and sends in the caller's thread: what gathered is sent at most
  ``FLUSH_S`` after a record arrives, and at once when the caller says it is idle (so a socket send,
  which wakes ZeroMQ's I/O thread, is not paid on every short step).
* :class:`ThreadSender`: the caller only puts the record on a ``queue.SimpleQueue`` bounded by the
  records bound; a daemon thread encodes and sends every ``FLUSH_S``.
* ZeroMQ reconnects by itself; after a reconnect (seen on a socket monitor polled every
  ``MONITOR_PERIOD_S``) the Hello is sent again. The socket is opened lazily, in the thread that
  sends, so that a sender created before a ``fork()`` works in the child (:meth:`Sender.after_fork_in_child`).
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.transport import messages

MONITOR_PERIOD_S = 0.5  # how often the socket monitor is polled for reconnects
LINGER_MS = 100  # at close, wait at most this long to flush queued messages
FLUSH_S = 0.05  # send at most this long after a record arrives (and at once when idle)
BATCH_MAX = 8  # records per Steps message at most; the ZeroMQ queue holds hwm // BATCH_MAX messages


class Wire:
    """The PUSH socket, opened lazily in the thread that sends (after any fork)."""

    def __init__(self, address: str, hwm_messages: int):
        self.address = address
        self.hwm_messages = hwm_messages
        self.ctx = self.sock = self.mon = None
        self.connects = 0
        self.next_check = 0.0

    def open(self) -> None:
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.hwm_messages)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(self.address)
        try:
            self.mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
        except zmq.ZMQError:  # monitoring unsupported: no Hello after reconnects
            self.mon = None
        self.ctx, self.sock = ctx, sock

    def close(self, linger_ms: int = LINGER_MS) -> None:
        sock, ctx, mon = self.sock, self.ctx, self.mon
        self.ctx = self.sock = self.mon = None
        if mon is not None:
            mon.close(linger=0)
        if sock is not None:
            sock.close(linger=linger_ms)
        if ctx is not None:
            ctx.term()

    def forget(self) -> None:
        """Drop (without closing) a socket inherited through fork()."""
        self.ctx = self.sock = self.mon = None
        self.connects = 0

    def send(self, data: bytes) -> bool:
        """Queue one message without blocking; False if it had to be dropped."""
        if self.sock is None:
            self.open()
        try:
            self.sock.send(data, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:  # zmq.Again (queue full) or a closed socket
            return False

    def reconnected(self, now: float) -> bool:
        """True when a peer connected again after the first connection (polled every MONITOR_PERIOD_S)."""
        if now < self.next_check or self.mon is None:
            return False
        self.next_check = now + MONITOR_PERIOD_S
        again = False
        while self.mon.poll(0):
            from zmq.utils.monitor import recv_monitor_message

            event = recv_monitor_message(self.mon, zmq.NOBLOCK)
            if event.get("event") == zmq.EVENT_CONNECTED:
                self.connects += 1
                again = again or self.connects > 1
        return again


class Sender:
    """What both senders share: the wire, the Hello, the drop counts, the Steps encoding.

    Each sender has ``send_hello(data)``, ``send(record, now, idle)``, ``tick(now)`` (called when there
    was nothing to send) and ``close(timeout_s)``; none of them blocks on the peer."""

    kind = ""

    def __init__(self, address: str, hwm: int = messages.SEND_HWM):
        # ZeroMQ counts messages; a message carries 1..BATCH_MAX records: at most ``hwm`` records queue.
        self.wire = Wire(address, max(1, hwm // BATCH_MAX))
        self.hwm = hwm
        self.pid = os.getpid()
        #: a random token naming this engine process to the sidecar (drawn again in a forked child)
        self.session = secrets.token_hex(8)
        self.hello: bytes | None = None  # the encoded Hello, sent again after a reconnect
        self.dropped = 0  # records the wire dropped (ZeroMQ queue full)
        self.queue_dropped = 0  # records lost before the wire (caller's or sender's queue full)
        self.on_error: Callable[[BaseException], None] | None = None  # errors of the sending thread
        self.reported = 0  # the drop count the last message the wire took carried

    def dropped_total(self) -> int:
        return self.dropped + self.queue_dropped

    def lost(self, n: int = 1) -> None:
        """Count ``n`` records the caller lost before handing them over (reported in ``dropped_total``)."""
        self.queue_dropped += n

    def after_fork_in_child(self) -> None:
        self.pid = os.getpid()
        self.session = secrets.token_hex(8)
        self.wire.forget()
        self.hello = None

    def stamp_hello(self, data: bytes) -> bytes:
        """The encoded Hello with this sender's session token (once per Hello, not on the step path)."""
        try:
            hello = messages.decode(data)
            if isinstance(hello, messages.Hello) and not hello.session:
                return messages.encode(msgspec.structs.replace(hello, session=self.session))
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        return data

    def _send_records(self, records: list) -> None:
        total = self.dropped + self.queue_dropped
        data = messages.encode(messages.Steps(self.pid, records, total, self.session))
        if self.wire.send(data):
            self.reported = total
        else:
            self.dropped += len(records)

    def _close_wire(self, timeout_s: float) -> None:
        """At shutdown (never on the step path): when records were dropped since the last message the
        wire took, send their count in a last, empty Steps message (retried until ``timeout_s``), so
        that nothing is lost uncounted; then close, letting ZeroMQ flush for what is left of ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.wire.sock is not None and self.dropped + self.queue_dropped > self.reported:
            total = self.dropped + self.queue_dropped
            if self.wire.send(messages.encode(messages.Steps(self.pid, [], total, self.session))):
                self.reported = total
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        self.wire.close(max(LINGER_MS, int(1000 * (deadline - time.monotonic()))))


class DirectSender(Sender):
    """Encodes and sends in the caller's thread, batching the records of the last ``FLUSH_S``."""

    kind = "direct"

    def __init__(self, address: str, hwm: int = messages.SEND_HWM):
        super().__init__(address, hwm)
        self.batch: list[StepRecord] = []
        self.last_flush = 0.0

    def send_hello(self, data: bytes) -> None:
        self.hello = data = self.stamp_hello(data)
        if self.batch:
            self.flush(time.monotonic())
        self.wire.send(data)

    def send(self, record: StepRecord, now: float, idle: bool) -> None:
        batch = self.batch
        batch.append(record)
        if idle or len(batch) >= BATCH_MAX or now - self.last_flush >= FLUSH_S:
            self.flush(now)

    def tick(self, now: float) -> None:
        """Nothing to send this time: send what waits if it is due."""
        if self.batch and now - self.last_flush >= FLUSH_S:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Send the batched records as one Steps message, without blocking."""
        records, self.batch = self.batch, []
        self.last_flush = now
        if records:
            self._send_records(records)
        if now >= self.wire.next_check and self.wire.reconnected(now) and self.hello is not None:
            self.wire.send(self.hello)

    def close(self, timeout_s: float = 0.3) -> None:
        if self.batch:
            self.flush(time.monotonic())
        self._close_wire(timeout_s)

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self.batch = []


class ThreadSender(Sender):
    """The caller puts records on a bounded queue; a daemon thread encodes and sends them."""

    kind = "thread"

    def __init__(self, address: str, hwm: int = messages.SEND_HWM):
        super().__init__(address, hwm)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def send_hello(self, data: bytes) -> None:
        self.hello = data = self.stamp_hello(data)
        if self.thread is None:
            self._start_thread()
        self.queue.put(data)

    def send(self, record: StepRecord, now: float, idle: bool) -> None:
        if self.queue.qsize() < self.hwm:
            if self.thread is None:
                self._start_thread()
            self.queue.put(record)
        else:
            self.queue_dropped += 1

    def tick(self, now: float) -> None:
        """Nothing to do: the thread sends on its own schedule."""

    def close(self, timeout_s: float = 0.3) -> None:
        """Send what is queued (bounded wait), stop the thread, close the socket."""
        t = self.thread
        if t is not None:
            deadline = time.monotonic() + timeout_s
            while self.queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.005)
            self.thread = None  # the sender loop ends
            self.queue.put(None)  # wakes it
            t.join(timeout_s)
            if t.is_alive():
                return  # still sending: leave its socket alone
        self._close_wire(timeout_s)

    def after_fork_in_child(self) -> None:
        super().after_fork_in_child()
        self.queue = queue.SimpleQueue()
        self.thread = None

    def _start_thread(self) -> None:
        t = threading.Thread(target=self._run, name="wattprint-sender", daemon=True)
        self.thread = t
        t.start()

    def _run(self) -> None:
        q, wire = self.queue, self.wire
        try:
            while self.thread is threading.current_thread():
                try:
                    item = q.get(timeout=MONITOR_PERIOD_S)
                except queue.Empty:
                    item = None
                self._drain(q, item)
                if self.hello is not None and wire.sock is not None and wire.reconnected(time.monotonic()):
                    wire.send(self.hello)
                time.sleep(FLUSH_S)  # let records gather: fewer, larger messages, fewer wake-ups
        except Exception as exc:  # noqa: BLE001
            if self.on_error is not None:
                self.on_error(exc)

    def _drain(self, q: queue.SimpleQueue, item) -> None:
        """Send ``item`` and whatever else is queued, in order, ``BATCH_MAX`` records a message."""
        records = []
        while item is not None:
            if type(item) is bytes:  # a Hello: keep the order
                if records:
                    self._send_records(records)
                    records = []
                self.wire.send(item)
            else:
                records.append(item)
            if len(records) >= BATCH_MAX:
                self._send_records(records)
                records = []
            try:
                item = q.get_nowait()
            except queue.Empty:
                item = None
        if records:
            self._send_records(records)


SENDERS = {cls.kind: cls for cls in (DirectSender, ThreadSender)}
