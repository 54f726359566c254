"""The receiving end of the wire: a ZeroMQ ``PULL`` socket, a receive thread and a bounded queue.

The receiver binds ``ipc://PATH`` (file mode 0600; a stale socket file left by a dead process is removed,
a live one or a non-socket refused), decodes each message and puts it in a :class:`MessageQueue`
bounded in messages, in entries (request entries of the queued records) and in wire bytes. It never
waits on the consumer: what does not fit is counted as ``queue_full``, undecodable messages as
``decode_error``, and the increase of each hook's own drop count (``Steps.dropped_total``) as
``hook_queue_full`` - checked first: an increase no hook could reach in the time since its previous
message (:data:`~wattprint.profiler.core.validate.MAX_STEPS_PER_S`; a first report over ``MAX_STEP``) is not added, but counted as an
internal error ``implausible_drop_count``.

Each queued item is ``(message, t_received, gap)``: ``gap`` is True when records of that engine session
were lost just before it (dropped here, or by its hook), so that the requests it had in flight are
reported ``incomplete``. :meth:`MessageQueue.oldest_t` is the receive time of the oldest queued message
(the consumer does not settle time it has not read yet, and reports the backlog).

Load: the consumer's costs are mostly per batch, so :meth:`MessageQueue.get_some` lets a burst gather
for up to ``gather_s`` (20 ms) after its first message, and a ``Steps`` message that follows one of the
same session still queued, with nothing lost between them, joins it (its records appended, up to
``merge_entries`` entries): the consumer wakes once and checks and attributes one bigger batch.

Counting and logging go to ``stats``, any object with ``count_drop(reason, n)``, ``count_message()``,
``count_error(where)``, ``fail(where, msg, *args)`` and ``warn(key, msg, *args)`` (the sidecar's
:class:`~wattprint.profiler.sidecar.stats.Counters`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from collections import OrderedDict, deque

import msgspec
import zmq

from wattprint.errors import ConfigError
from wattprint.profiler.core.validate import MAX_STEP, MAX_STEPS_PER_S, STEP_JUMP_SLACK
from wattprint.profiler.transport import messages as transport

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = transport.MAX_MESSAGE_BYTES
RECV_HWM = 4_096  # messages ZeroMQ buffers before the peer's sends start to fail (and are counted there)
_MAX_SESSIONS = 256  # hooks whose drop count is remembered


class MessageQueue:
    """Bounded FIFO between the receive thread and its consumer, bounded in messages, in request
    entries and in wire bytes; consecutive ``Steps`` of one session join (see the module docstring)."""

    def __init__(self, max_entries: int, max_messages: int, max_bytes: int = 32 << 20, *,
                 gather_s: float = 0.02, merge_entries: int = 8192):
        self.max_entries = max_entries
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.gather_s = gather_s
        self.merge_entries = merge_entries
        self._items: deque = deque()
        self._entries = 0
        self._bytes = 0
        self._cond = threading.Condition()

    def put(self, item, n_entries: int, n_bytes: int = 0, t: float | None = None, gap: bool = False) -> bool:
        """Queue ``item`` holding ``n_entries`` entries; False (nothing queued) when it does not fit."""
        with self._cond:
            items = self._items
            if len(items) >= self.max_messages or (n_entries and self._entries + n_entries > self.max_entries) \
                    or (items and self._bytes + n_bytes > self.max_bytes):
                return False
            was_empty = not items
            tail = items[-1] if items and not gap else None
            if tail is not None and tail[3] + n_entries <= self.merge_entries and _joins(tail[0], item):
                tail[0].records.extend(item.records)
                items[-1] = (tail[0], tail[1], tail[2], tail[3] + n_entries, tail[4] + n_bytes)
            else:
                items.append((item, time.monotonic() if t is None else t, gap, n_entries, n_bytes))
            self._entries += n_entries
            self._bytes += n_bytes
            if was_empty or self._ready():
                self._cond.notify()  # the first item, or a batch worth waking for (see get_some)
            return True

    def get_all(self, timeout_s: float) -> list:
        """Everything queued as ``(message, t_received, gap)``, after waiting up to ``timeout_s`` for
        something when empty."""
        with self._cond:
            if not self._items and timeout_s > 0:
                self._cond.wait(timeout_s)
            items = [it[:3] for it in self._items]
            self._items.clear()
            self._entries = self._bytes = 0
            return items

    def get_some(self, timeout_s: float, max_entries: int) -> list:
        """Like :meth:`get_all`, but at most about ``max_entries`` entries (at least one message); once
        something is queued, waits until its oldest item is ``gather_s`` old, ``merge_entries`` entries
        (or half a bound) are queued, or ``timeout_s`` has passed, whichever comes first."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            if not self._items and timeout_s > 0:
                self._cond.wait(timeout_s)
            while self._items and not self._ready():
                left = min(self._items[0][1] + self.gather_s, deadline) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            out, n = [], 0
            while self._items and (not out or n + self._items[0][3] <= max_entries):
                it = self._items.popleft()
                out.append(it[:3])
                n += it[3]
                self._entries -= it[3]
                self._bytes -= it[4]
            return out

    def _ready(self) -> bool:
        """Enough is queued to stop gathering: ``merge_entries`` entries, or half of any bound."""
        return (self._entries >= min(self.merge_entries, self.max_entries // 2) or self._bytes >= self.max_bytes // 2
                or len(self._items) >= self.max_messages // 2)

    def oldest_t(self) -> float | None:
        """When the oldest queued message was received (None when empty)."""
        with self._cond:
            return self._items[0][1] if self._items else None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


def _joins(queued, msg) -> bool:
    """``msg`` may join the queued message: both ``Steps`` of one engine session."""
    return (type(queued) is transport.Steps and type(msg) is transport.Steps and msg.session == queued.session
            and msg.pid == queued.pid)


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse if one is still listening or it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            log.info("wattprint sidecar: removed stale socket %s", path)
            return
        raise ConfigError(f"cannot probe socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise ConfigError(f"another process is listening on {path} (another sidecar?)")


class Receiver:
    """Binds ``address``, receives on a thread (:meth:`start`) and fills ``queue`` until :meth:`stop`."""

    def __init__(self, address: str, queue: MessageQueue, stats):
        self.address = address
        #: the socket file of an ``ipc://`` address (None for tcp://)
        self.socket_file = address[len("ipc://"):] if address.startswith("ipc://") else None
        self.queue = queue
        self.stats = stats
        self._hook_dropped: OrderedDict[str, tuple[int, float]] = OrderedDict()  # session -> (total, t)
        self._lost: set[str] = set()  # sessions whose records were dropped here since their last message
        self._hook_lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx: zmq.Context | None = None
        self._sock = None
        self._thread: threading.Thread | None = None

    def bind(self) -> None:
        """Bind the PULL socket (raises :class:`ConfigError` when the address is taken or unusable)."""
        if self.socket_file:
            parent = os.path.dirname(self.socket_file)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            remove_stale_socket(self.socket_file)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind {self.address}: {exc}") from exc
        if self.socket_file:
            os.chmod(self.socket_file, 0o600)
        self._sock = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="wattprint-recv", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop receiving, close the socket and remove its file. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        elif self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.socket_file and self._sock is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_file).st_mode):
                    os.unlink(self.socket_file)
            except OSError:
                pass
            self._sock = None

    def _loop(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not poller.poll(100):
                        continue
                    while not self._stop.is_set():
                        try:
                            data = sock.recv(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self.on_message(data)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.ETERM:
                        break
                    self.stats.fail("receive", "receive failed")
                    time.sleep(0.05)
                except Exception:  # noqa: BLE001 - the receive thread must survive anything
                    self.stats.fail("receive", "receive loop error")
        finally:
            sock.close(0)

    def on_message(self, data: bytes) -> None:
        """Decode one message and queue it (or count why not)."""
        self.stats.count_message()
        try:
            msg = transport.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.count_drop("decode_error")
            self.stats.warn("decode", "undecodable message (%d bytes): %s", len(data), exc)
            return
        if isinstance(msg, transport.Steps):
            key = transport.session_key(msg)
            gap = self._note_hook_drops(key, msg.dropped_total)
            n = sum(len(r.requests) for r in msg.records)
            if not msg.records:
                if gap:
                    with self._hook_lock:
                        self._lost.add(key)
                return
            with self._hook_lock:
                gap = gap or key in self._lost
                self._lost.discard(key)
            if not self.queue.put(msg, max(n, 1), len(data), gap=gap):
                self.stats.count_drop("queue_full", len(msg.records))
                with self._hook_lock:
                    self._lost.add(key)
        elif not self.queue.put(msg, 0, len(data)):
            self.stats.count_drop("queue_full")
            self.stats.warn("hello_drop", "queue full, a Hello from pid %s was dropped", msg.pid)

    def _note_hook_drops(self, key: str, total: int) -> bool:
        """Count the increase of a hook's drop count; True when it dropped records since its last message."""
        now = time.monotonic()
        with self._hook_lock:
            prev, t_prev = self._hook_dropped.pop(key, (0, None))
            delta = total - prev if total >= prev else total  # smaller: a new process reused the pid
            plausible = total >= 0 and delta <= (MAX_STEP if t_prev is None
                                                 else MAX_STEPS_PER_S * (now - t_prev) + STEP_JUMP_SLACK)
            if plausible:
                self._hook_dropped[key] = (total, now)
            elif t_prev is not None:
                self._hook_dropped[key] = (prev, t_prev)
            while len(self._hook_dropped) > _MAX_SESSIONS:
                self._hook_dropped.popitem(last=False)
        if not plausible:
            self.stats.count_error("implausible_drop_count")
            self.stats.warn("drop_count", "hook %s reports %d dropped records, more than it could have; ignored",
                            key, total)
            return True
        self.stats.count_drop("hook_queue_full", delta)
        return delta > 0
