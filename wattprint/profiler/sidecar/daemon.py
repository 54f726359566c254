"""The sidecar: receives step records from the engine hook, attributes measured energy online, and
exports it (Prometheus ``/metrics``, ``/v1/requests/{id}``, the request ledger).

Threads, none of which waits on another's slow work:

* **receive** - a ZeroMQ ``PULL`` socket bound on ``ipc://PATH`` (file mode 0600). It decodes each
  message and puts it in a bounded queue (bounded in records); what does not fit is counted in
  ``wattprint_dropped_records_total{reason="queue_full"}``, undecodable messages as ``decode_error``,
  and the hook's own drop count (``Steps.dropped_total``) as ``hook_queue_full``.
* **timeline** - polls the meter (``EnergyTimeline``) and hands each reading to the attributor.
* **worker** - drains the queue into the attributor and, every ``advance_interval_s``, settles the
  complete energy windows: the requests that became final go to the ledger, the histograms and a
  bounded store of recent results that ``/v1/requests/{id}`` reads; the attributor forgets them.
* **http** - the metrics server; each scrape reads one snapshot under the sidecar's lock.

The attributor is created when the first ``Hello`` arrives (geometry from its ``model_config``). A
``Hello`` for another model finishes the current attributor and starts a new one; the counters carry
on (totals of earlier attributors are kept per model). Every exception raised by wattprint code on
these threads is logged (rate-limited) and counted in ``wattprint_internal_errors_total{where}``; the
sidecar keeps running.

Restart: a new sidecar on the same path removes the stale socket file and binds again; ZeroMQ
reconnects the hook by itself. The last ``Hello`` is kept next to the socket (``PATH.hello``, mode
0600), so that steps arriving from the same engine process (pid) before its hook says Hello again are
attributed; other steps before any Hello cannot be (no geometry) and are counted as ``no_hello``.
The ledger skips final ids it already holds.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import msgspec
import zmq

from wattprint.errors import ConfigError, InputError
from wattprint.exporters.ledger import Ledger
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.exporters.histograms import ENERGY_PER_TOKEN_BUCKETS_J, REQUEST_ENERGY_BUCKETS_J, HistogramState
from wattprint.exporters.prometheus import MetricsSnapshot, make_registry
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.core.costmodel import (
    ModelGeometry,
    geometry_from_config,
    kv_read_bytes,
    kv_write_bytes,
    request_flops,
)
from wattprint.profiler.core.hardware import HardwareProfile, load_profile
from wattprint.profiler.meters.base import Meter, Reading
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.core.strata import normalize

log = logging.getLogger(__name__)

METER_CHOICES = ("auto", "nvml", "rapl", "cputime", "simulated")
MAX_MESSAGE_BYTES = 64 << 20  # a bigger message disconnects the peer (ZMQ_MAXMSGSIZE)
_POWER_WINDOW_S = 1.0


# -------------------------------------------------------------------------------------- helpers
def default_hardware(meter: Meter) -> str:
    """The shipped hardware profile matching a meter: NVML device name, else the CPU profile."""
    source = getattr(meter, "source", "") or ""
    if source == "simulated":
        return "h100-sxm"
    if source == "nvml":
        try:
            names = " ".join(d.name for d in meter.devices).lower()
        except Exception:  # noqa: BLE001 - a broken meter must not stop the choice
            names = ""
        for pattern, profile in ((r"h200", "h200"), (r"h100", "h100-sxm"), (r"a100", "a100-sxm"),
                                 (r"\bl4\b", "l4")):
            if re.search(pattern, names):
                return profile
        return "h100-sxm"
    return "cpu"


def add_totals(a: Totals, b: Totals) -> Totals:
    """Elementwise sum of two cumulative totals (``b``'s source and coefficients win)."""

    def add_nested(x: dict, y: dict) -> dict:
        out = {k: dict(v) for k, v in x.items()}
        for k, v in y.items():
            d = out.setdefault(k, {})
            for kk, vv in v.items():
                d[kk] = d.get(kk, 0.0) + vv
        return out

    def add_flat(x: dict, y: dict) -> dict:
        out = dict(x)
        for k, v in y.items():
            out[k] = out.get(k, 0.0) + v
        return out

    n = max(len(a.device_measured_j), len(b.device_measured_j))
    dev = [
        (a.device_measured_j[i] if i < len(a.device_measured_j) else 0.0)
        + (b.device_measured_j[i] if i < len(b.device_measured_j) else 0.0)
        for i in range(n)
    ]
    starts = [t for t in (a.t_start, b.t_start) if t is not None]
    ends = [t for t in (a.t_end, b.t_end) if t is not None]
    return Totals(
        measured_j=a.measured_j + b.measured_j,
        attributed_j=a.attributed_j + b.attributed_j,
        idle_j=a.idle_j + b.idle_j,
        source=b.source or a.source,
        t_start=min(starts) if starts else None,
        t_end=max(ends) if ends else None,
        prefill_j=a.prefill_j + b.prefill_j,
        decode_j=a.decode_j + b.decode_j,
        kv_j=a.kv_j + b.kv_j,
        requests=a.requests + b.requests,
        steps=a.steps + b.steps,
        device_measured_j=dev,
        coefficients=dict(b.coefficients or a.coefficients),
        energy_j_by_phase_stratum=add_nested(a.energy_j_by_phase_stratum, b.energy_j_by_phase_stratum),
        kv_j_by_stratum=add_flat(a.kv_j_by_stratum, b.kv_j_by_stratum),
        tokens_by_phase_stratum=add_nested(a.tokens_by_phase_stratum, b.tokens_by_phase_stratum),
        kv_read_bytes=a.kv_read_bytes + b.kv_read_bytes,
        kv_write_bytes=a.kv_write_bytes + b.kv_write_bytes,
    )


_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # vLLM >= 0.11 appends "-<8 hex>" to external ids
_CHILD_PREFIX = re.compile(r"^\d+_")  # parallel sampling (n > 1): "<index>_<parent id>"
_PROMPT_INDEX = re.compile(r"^(cmpl-.+)-\d+$")  # /v1/completions: "<response id>-<prompt index>"


def request_aliases(engine_id: str) -> list[str]:
    """The client-visible ids an engine request id answers to, most specific first.

    vLLM turns the OpenAI response id ``chatcmpl-X`` / ``cmpl-X`` into engine ids
    ``chatcmpl-X-<8 hex>``, ``cmpl-X-<prompt index>-<8 hex>``, ``<i>_chatcmpl-X...`` (n > 1).
    """
    out = []
    rid = engine_id
    for pattern, repl in ((_ENGINE_SUFFIX, ""), (_CHILD_PREFIX, ""), (_PROMPT_INDEX, r"\1")):
        new = pattern.sub(repl, rid)
        if new != rid and new:
            out.append(new)
            rid = new
    return out


def combine_results(rid: str, parts: list[RequestResult]) -> RequestResult:
    """One result for a client id that maps to several engine requests (several prompts, n > 1)."""
    starts = [p.t_start for p in parts if p.t_start is not None]
    ends = [p.t_end for p in parts if p.t_end is not None]
    return RequestResult(
        id=rid,
        energy_j=sum(p.energy_j for p in parts),
        prefill_j=sum(p.prefill_j for p in parts),
        decode_j=sum(p.decode_j for p in parts),
        kv_j=sum(p.kv_j for p in parts),
        kv_read_bytes=sum(p.kv_read_bytes for p in parts),
        kv_write_bytes=sum(p.kv_write_bytes for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        output_tokens=sum(p.output_tokens for p in parts),
        flops=sum(p.flops for p in parts),
        stratum=parts[0].stratum,
        source=parts[0].source,
        t_start=min(starts) if starts else None,
        t_end=max(ends) if ends else None,
        model=parts[0].model,
        status="final" if all(p.status == "final" for p in parts) else "provisional",
    )


class _RateLimitedLog:
    """Log an error at most once per ``interval_s`` per key (the rest are counted, not printed)."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, key: str, msg: str, *args, exc_info=True) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e18) >= self.interval_s:
            n = self._suppressed.pop(key, 0)
            suffix = f" ({n} similar suppressed)" if n else ""
            log.error(msg + suffix, *args, exc_info=exc_info)
            self._last[key] = now
        else:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1


class _MessageQueue:
    """Bounded FIFO between the receive and worker threads, bounded in records and in messages."""

    def __init__(self, max_records: int, max_messages: int):
        self.max_records = max_records
        self.max_messages = max_messages
        self._items: deque = deque()
        self._records = 0
        self._cond = threading.Condition()

    def put(self, item, n_records: int) -> bool:
        with self._cond:
            if len(self._items) >= self.max_messages or (n_records and self._records + n_records > self.max_records):
                return False
            self._items.append((item, n_records))
            self._records += n_records
            self._cond.notify()
            return True

    def get_all(self, timeout_s: float) -> list:
        with self._cond:
            if not self._items and timeout_s > 0:
                self._cond.wait(timeout_s)
            items = [item for item, _ in self._items]
            self._items.clear()
            self._records = 0
            return items

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._items)


def _default_attributor_factory(geometry, profile, *, n_devices, source, model_name, window_s):
    from wattprint.profiler.attribution.legacy import OnlineAttributor

    return OnlineAttributor(geometry, profile, n_devices=n_devices, source=source, model_name=model_name,
                            window_s=window_s)


def _default_timeline_factory(meter, rate_hz, on_reading):
    from wattprint.profiler.timeline.sampler import EnergyTimeline

    return EnergyTimeline(meter, rate_hz=rate_hz, on_reading=on_reading)


# -------------------------------------------------------------------------------------- sidecar
class Sidecar:
    """Receive, attribute, export. See the module docstring.

    ``metrics_port=0`` binds an ephemeral port; the bound one is ``.metrics_port`` after
    :meth:`start`. ``hardware`` is a profile name or path (default: from the meter, see
    :func:`default_hardware`). ``attributor_factory`` and ``timeline_factory`` exist for tests.
    """

    def __init__(
        self,
        meter: Meter,
        *,
        socket_path: str | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 9464,
        ledger_path: str | os.PathLike | None = None,
        hardware: str | os.PathLike | HardwareProfile | None = None,
        window_s: float = 2.0,
        advance_interval_s: float = 0.25,
        meter_rate_hz: float = 50.0,
        queue_records: int = 100_000,
        queue_messages: int = 10_000,
        recent_results: int = 20_000,
        alias_capacity: int = 100_000,
        attributor_factory: Callable | None = None,
        timeline_factory: Callable | None = None,
    ):
        self.meter = meter
        self.address = transport.address(socket_path)
        self.socket_file = self.address[len("ipc://"):] if self.address.startswith("ipc://") else None
        #: the last Hello, kept for a restarted sidecar (next to the socket; none for tcp:// addresses)
        self.hello_path = f"{self.socket_file}.hello" if self.socket_file else None
        self._resume_hello: transport.Hello | None = None
        self.metrics_host = metrics_host
        self._metrics_port_requested = metrics_port
        self.metrics_port: int | None = None
        self.ledger_path = ledger_path
        self.window_s = window_s
        self.advance_interval_s = advance_interval_s
        self.meter_rate_hz = meter_rate_hz
        self.recent_capacity = max(1, recent_results)
        self.alias_capacity = max(1, alias_capacity)
        self._attributor_factory = attributor_factory or _default_attributor_factory
        self._timeline_factory = timeline_factory or _default_timeline_factory
        if isinstance(hardware, HardwareProfile):
            self.profile = hardware
        else:
            self.profile = load_profile(hardware or default_hardware(meter))
        self.source = getattr(meter, "source", "unknown")
        try:
            self.device_names = [d.name for d in meter.devices]
        except Exception:  # noqa: BLE001
            self.device_names = []

        self._lock = threading.RLock()  # attributor, histograms, counters of results
        self._stats_lock = threading.Lock()  # drop / error counters (touched by every thread)
        self._queue = _MessageQueue(queue_records, queue_messages)
        self._stop = threading.Event()
        self._rlog = _RateLimitedLog()

        # attribution state (under _lock)
        self._attributor = None
        self._model: str | None = None
        self._model_key = None
        self._geometry: ModelGeometry | None = None
        self._unsupported: str | None = None  # model of the last Hello that could not be modelled
        self._base_totals: dict[str, Totals] = {}
        self._requests: dict[tuple[str, str], int] = {}
        self._hist_energy: dict[tuple[str, str], HistogramState] = {}
        self._hist_per_token: dict[tuple[str, str], HistogramState] = {}
        self._steps = 0
        self._lag_s: float | None = None
        self._recent: OrderedDict[str, RequestResult] = OrderedDict()
        self._aliases: OrderedDict[str, list[str]] = OrderedDict()
        self._hellos = 0

        # counters (under _stats_lock)
        self._dropped: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._hook_dropped: OrderedDict[int, int] = OrderedDict()
        self._messages = 0

        # power (timeline thread writes, scrape reads; under _stats_lock)
        self._power_readings: deque[Reading] = deque()
        self._last_reading_t: float | None = None

        self._ctx: zmq.Context | None = None
        self._sock = None
        self._recv_thread: threading.Thread | None = None
        self._worker_thread: threading.Thread | None = None
        self._timeline = None
        self._server: MetricsServer | None = None
        self.ledger: Ledger | None = None
        self._started = False
        self._stopped = False
        self._t_started: float | None = None

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> Sidecar:
        if self._started:
            return self
        self._started = True
        self._t_started = time.monotonic()
        try:
            if self.ledger_path is not None:
                self.ledger = Ledger(self.ledger_path)
                if self.ledger.truncated_bytes:
                    self._count_error("ledger_torn_line")
            self._bind()
            self._load_hello()
            self._recv_thread = threading.Thread(target=self._recv_loop, name="wattprint-recv", daemon=True)
            self._recv_thread.start()
            self._worker_thread = threading.Thread(target=self._worker_loop, name="wattprint-attr", daemon=True)
            self._worker_thread.start()
            self._timeline = self._timeline_factory(self.meter, self.meter_rate_hz, self._on_reading)
            self._timeline.start()
            if self._metrics_port_requested is not None:
                app = make_app(make_registry(self.snapshot), self.lookup, self.health)
                try:
                    server = MetricsServer(app, self.metrics_host, self._metrics_port_requested)
                except OSError as exc:
                    raise ConfigError(f"cannot serve metrics on {self.metrics_host}:{self._metrics_port_requested}: "
                                      f"{exc.strerror or exc}") from exc
                self._server = server.start()
                self.metrics_port = self._server.port
        except BaseException:
            self.stop()
            raise
        log.info("wattprint sidecar: receiving on %s, meter %s (%s), hardware %s%s", self.address, self.source,
                 ", ".join(self.device_names) or "no devices", self.profile.name,
                 f", metrics on {self.metrics_url}" if self._server else "")
        return self

    @property
    def metrics_url(self) -> str | None:
        return self._server.url if self._server else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _bind(self) -> None:
        if self.socket_file:
            _remove_stale_socket(self.socket_file)
            parent = os.path.dirname(self.socket_file)
            if parent:
                os.makedirs(parent, exist_ok=True)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        try:
            sock.bind(self.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConfigError(f"cannot bind {self.address}: {exc}") from exc
        if self.socket_file:
            os.chmod(self.socket_file, 0o600)
        self._sock = sock

    def stop(self) -> None:
        """Stop receiving, attribute what was received, settle everything (``finish()``), close the
        ledger, stop the HTTP server. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._queue.wake()
        if self._recv_thread is not None:
            self._recv_thread.join(timeout=5)
        elif self._sock is not None:
            self._sock.close(0)
        if self._worker_thread is not None:
            self._worker_thread.join(timeout=30)
        if self._timeline is not None:
            try:
                self._timeline.stop()
            except Exception:  # noqa: BLE001
                self._fail("timeline", "stopping the meter timeline failed")
            try:  # one last reading, so that the final windows reach as close to now as possible
                self._on_reading(self.meter.read())
            except Exception:  # noqa: BLE001
                self._fail("reading", "the last meter reading failed")
        # the worker has exited: this thread owns the queue now
        try:
            self._process(self._queue.get_all(0))
        except Exception:  # noqa: BLE001
            self._fail("step", "processing queued messages at shutdown failed")
        with self._lock:
            att = self._attributor
        if att is not None:
            self._finish_attributor()
        if self.ledger is not None:
            try:
                self.ledger.close()
            except Exception:  # noqa: BLE001
                self._fail("ledger", "closing the ledger failed")
        if self._server is not None:
            self._server.stop()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self.socket_file and self._sock is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_file).st_mode):
                    os.unlink(self.socket_file)
            except OSError:
                pass

    # ---------------------------------------------------------------------------------- errors
    def _count_drop(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._stats_lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def _count_error(self, where: str) -> None:
        with self._stats_lock:
            self._errors[where] = self._errors.get(where, 0) + 1

    def _fail(self, where: str, msg: str, *args) -> None:
        self._count_error(where)
        self._rlog(where, "wattprint sidecar: " + msg, *args)

    # --------------------------------------------------------------------------------- receive
    def _recv_loop(self) -> None:
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
                        self._on_message(data)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.ETERM:
                        break
                    self._fail("receive", "receive failed")
                    time.sleep(0.05)
                except Exception:  # noqa: BLE001
                    self._fail("receive", "receive loop error")
        finally:
            sock.close(0)

    def _on_message(self, data: bytes) -> None:
        with self._stats_lock:
            self._messages += 1
        try:
            msg = transport.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._count_drop("decode_error")
            self._rlog("decode", "wattprint sidecar: undecodable message (%d bytes): %s", len(data), exc,
                       exc_info=False)
            return
        if isinstance(msg, transport.Steps):
            self._note_hook_drops(msg.pid, msg.dropped_total)
            n = len(msg.records)
            if n and not self._queue.put(msg, n):
                self._count_drop("queue_full", n)
        else:
            if not self._queue.put(msg, 0):
                self._count_drop("queue_full")
                self._rlog("hello_drop", "wattprint sidecar: queue full, a Hello from pid %s was dropped",
                           msg.pid, exc_info=False)

    def _note_hook_drops(self, pid: int, total: int) -> None:
        with self._stats_lock:
            prev = self._hook_dropped.pop(pid, 0)
            delta = total - prev if total >= prev else total  # smaller: a new process reused the pid
            self._hook_dropped[pid] = total
            while len(self._hook_dropped) > 256:
                self._hook_dropped.popitem(last=False)
            if delta > 0:
                self._dropped["hook_queue_full"] = self._dropped.get("hook_queue_full", 0) + delta

    # ---------------------------------------------------------------------------------- worker
    def _worker_loop(self) -> None:
        next_advance = time.monotonic() + self.advance_interval_s
        while not self._stop.is_set():
            try:
                items = self._queue.get_all(max(0.0, next_advance - time.monotonic()))
                self._process(items)
                now = time.monotonic()
                if now >= next_advance:
                    self._advance(now)
                    next_advance = now + self.advance_interval_s
            except Exception:  # noqa: BLE001 - the worker must survive anything
                self._fail("worker", "worker loop error")
                time.sleep(0.05)

    def _process(self, items: list) -> None:
        for msg in items:
            try:
                if isinstance(msg, transport.Hello):
                    self._on_hello(msg)
                else:
                    self._on_steps(msg)
            except Exception:  # noqa: BLE001
                self._count_drop("internal_error", len(getattr(msg, "records", ())) or 0)
                self._fail("step", "processing a %s message failed", type(msg).__name__)

    def _on_hello(self, hello: transport.Hello) -> None:
        self._hellos += 1
        with self._lock:
            self._resume_hello = None
        try:
            config_key = msgspec.json.encode(hello.model_config, order="sorted")
        except Exception:  # noqa: BLE001
            config_key = repr(hello.model_config).encode()
        # a new engine process (even with the same model) restarts its step numbers: new attributor
        key = (hello.model, config_key, hello.pid)
        with self._lock:
            if self._model_key == key and (self._attributor is not None or self._unsupported == hello.model):
                return  # the same engine again (the hook reconnected)
            current = self._attributor
            old_pid = self._model_key[2] if self._model_key else None
        if current is not None:
            log.warning("wattprint sidecar: Hello from pid %d (model %r) replaces pid %s (model %r); settling "
                        "the old engine's requests", hello.pid, hello.model, old_pid, self._model)
            self._finish_attributor()
        try:
            geometry = geometry_from_config(hello.model_config, name=hello.model)
        except (ConfigError, InputError) as exc:
            with self._lock:
                self._model_key = key
                self._model = hello.model
                self._unsupported = hello.model
                self._geometry = None
            self._save_hello(hello)
            self._count_error("unsupported_model")
            log.error(
                "wattprint sidecar: model %r cannot be modelled (%s); its steps will be dropped and counted "
                "in wattprint_dropped_records_total{reason=\"unsupported_model\"}", hello.model, exc,
            )
            return
        n_devices = len(self.device_names) or 1
        if hello.tensor_parallel_size != n_devices:
            log.warning("wattprint sidecar: the engine uses %d device(s) but the meter reads %d; all metered "
                        "devices are attributed", hello.tensor_parallel_size, n_devices)
        att = self._attributor_factory(geometry, self.profile, n_devices=n_devices, source=self.source,
                                       model_name=hello.model, window_s=self.window_s)
        with self._lock:
            with self._stats_lock:
                recent = list(self._power_readings)  # the last second of readings: steps may start before Hello
            for r in recent:
                try:
                    att.add_reading(r)
                except Exception:  # noqa: BLE001
                    self._fail("reading", "a meter reading could not be attributed")
            self._attributor = att
            self._geometry = geometry
            self._model = hello.model
            self._model_key = key
            self._unsupported = None
        self._save_hello(hello)
        log.info("wattprint sidecar: attributing model %r (%s, pid %d, %s %s)", hello.model, geometry.name,
                 hello.pid, hello.engine, hello.engine_version)

    def _save_hello(self, hello: transport.Hello) -> None:
        """Keep the engine's Hello next to the socket, for a restarted sidecar (see ``_load_hello``)."""
        if not self.hello_path:
            return
        tmp = f"{self.hello_path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, transport.encode(hello))
            finally:
                os.close(fd)
            os.replace(tmp, self.hello_path)
        except OSError:
            self._fail("hello_file", "cannot save the engine's Hello to %s", self.hello_path)

    def _load_hello(self) -> None:
        """A restarted sidecar may receive steps before the hook says Hello again: remember the last
        Hello the previous sidecar saw, to be used for steps from the same engine process (pid)."""
        if not self.hello_path:
            return
        try:
            with open(self.hello_path, "rb") as f:
                msg = transport.decode(f.read())
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("wattprint sidecar: ignoring unreadable %s: %s", self.hello_path, exc)
            return
        if isinstance(msg, transport.Hello):
            self._resume_hello = msg

    def _on_steps(self, msg: transport.Steps) -> None:
        with self._lock:
            resume = self._resume_hello
            need = self._attributor is None and self._unsupported is None
        if need and resume is not None and resume.pid == msg.pid:
            # steps from the engine that said Hello to the previous sidecar: reuse its Hello
            log.info("wattprint sidecar: steps from pid %d arrived before any Hello; resuming with the Hello "
                     "it sent to the previous sidecar (model %r)", msg.pid, resume.model)
            self._on_hello(resume)
        with self._lock:
            att = self._attributor
            if att is None:
                self._count_drop("unsupported_model" if self._unsupported else "no_hello", len(msg.records))
                return
            for rec in msg.records:
                try:
                    att.add_step(rec)
                except InputError as exc:
                    self._count_drop("invalid")
                    self._rlog("invalid", "wattprint sidecar: step %s rejected: %s", rec.step, exc, exc_info=False)
                    continue
                except Exception:  # noqa: BLE001
                    self._count_drop("internal_error")
                    self._fail("step", "attributor failed on step %s", rec.step)
                    continue
                self._steps += 1
                self._register_aliases(rec)
                self._observe_simulated(rec)

    def _register_aliases(self, rec: StepRecord) -> None:
        for r in rec.requests:
            for alias in request_aliases(r.id):
                ids = self._aliases.get(alias)
                if ids is None:
                    self._aliases[alias] = [r.id]
                    if len(self._aliases) > self.alias_capacity:
                        self._aliases.popitem(last=False)
                elif r.id not in ids and len(ids) < 256:
                    ids.append(r.id)

    def _observe_simulated(self, rec: StepRecord) -> None:
        """With the simulated meter, report the step's cost-model activity so its power follows the load."""
        observe = getattr(self.meter, "observe", None)
        g = self._geometry
        if observe is None or self.source != "simulated" or g is None or not rec.requests:
            return
        try:
            new = sum(r.prefill_tokens + r.decode_tokens for r in rec.requests)
            flops = sum(float(request_flops(g, r.prefill_tokens + r.decode_tokens, r.context_tokens))
                        for r in rec.requests)
            kv = sum(float(kv_read_bytes(g, r.context_tokens) + kv_write_bytes(g, r.prefill_tokens + r.decode_tokens))
                     for r in rec.requests)
            if new > 0:
                observe(rec.t_start, rec.t_end, flops, kv + g.weight_bytes)
        except Exception:  # noqa: BLE001
            self._fail("simulated_meter", "feeding the simulated meter failed")

    def _on_reading(self, reading: Reading) -> None:
        """Timeline callback (meter thread)."""
        try:
            with self._stats_lock:
                self._power_readings.append(reading)
                while len(self._power_readings) > 2 and reading.t_s - self._power_readings[1].t_s >= _POWER_WINDOW_S:
                    self._power_readings.popleft()
                self._last_reading_t = reading.t_s
            with self._lock:
                if self._attributor is not None:
                    self._attributor.add_reading(reading)
        except Exception:  # noqa: BLE001
            self._fail("reading", "a meter reading could not be attributed")

    def _advance(self, now: float) -> None:
        with self._lock:
            att = self._attributor
            if att is None:
                return
            try:
                results = att.advance(now)
            except Exception:  # noqa: BLE001
                self._fail("advance", "attribution advance failed")
                return
            try:
                self._lag_s = float(att.lag_s(now))
            except Exception:  # noqa: BLE001
                self._fail("advance", "attribution lag failed")
            self._record_results(results)
        self._write_ledger(results)

    def _finish_attributor(self) -> None:
        """Settle the current attributor (model change or shutdown) and fold its totals into the base."""
        with self._lock:
            att = self._attributor
            if att is None:
                return
            try:
                results = att.finish()
            except Exception:  # noqa: BLE001
                self._fail("advance", "attribution finish failed")
                results = []
            self._record_results(results)
            try:
                t = att.totals()
                model = self._model or ""
                self._base_totals[model] = add_totals(self._base_totals[model], t) if model in self._base_totals else t
            except Exception:  # noqa: BLE001
                self._fail("advance", "attribution totals failed")
            self._attributor = None
            self._model_key = None
            self._lag_s = None
        self._write_ledger(results)

    def _record_results(self, results: list[RequestResult]) -> None:
        """Histograms, counters and the recent store (caller holds ``_lock``)."""
        for res in results:
            try:
                if res.model is None and self._model is not None:
                    res.model = self._model
                self._recent[res.id] = res
                self._recent.move_to_end(res.id)
                while len(self._recent) > self.recent_capacity:
                    self._recent.popitem(last=False)
                if res.status != "final":
                    continue  # cut short by a shutdown or an engine change: stored, not counted
                model = res.model or ""
                stratum = normalize(res.stratum)
                key = (model, stratum)
                self._requests[key] = self._requests.get(key, 0) + 1
                ts = time.time()
                h = self._hist_energy.get(key)
                if h is None:
                    h = self._hist_energy[key] = HistogramState(REQUEST_ENERGY_BUCKETS_J)
                h.observe(res.energy_j, res.id, ts)
                if res.output_tokens:
                    h = self._hist_per_token.get(key)
                    if h is None:
                        h = self._hist_per_token[key] = HistogramState(ENERGY_PER_TOKEN_BUCKETS_J)
                    h.observe(res.energy_j / res.output_tokens, res.id, ts)
            except Exception:  # noqa: BLE001
                self._fail("results", "recording a result failed")

    def _write_ledger(self, results: list[RequestResult]) -> None:
        if self.ledger is None:
            return
        for res in results:
            try:
                self.ledger.append(res, model=res.model or self._model, source=res.source or self.source)
            except Exception:  # noqa: BLE001
                self._fail("ledger", "writing the ledger failed")

    # ---------------------------------------------------------------------------------- reading
    def snapshot(self) -> MetricsSnapshot:
        """Everything a scrape exports, at one instant (the attributor's totals under the lock)."""
        with self._lock:
            model_totals = dict(self._base_totals)
            coefficients: dict = {}
            if self._attributor is not None:
                try:
                    t = self._attributor.totals()
                except Exception:  # noqa: BLE001
                    self._fail("scrape", "attribution totals failed")
                    t = None
                if t is not None:
                    model = self._model or ""
                    model_totals[model] = add_totals(model_totals[model], t) if model in model_totals else t
                    coefficients = dict(t.coefficients or {})
            elif model_totals:
                coefficients = dict(list(model_totals.values())[-1].coefficients or {})
            requests = dict(self._requests)
            hist_energy = {k: h.copy() for k, h in self._hist_energy.items()}
            hist_token = {k: h.copy() for k, h in self._hist_per_token.items()}
            steps = self._steps
            lag = self._lag_s
        with self._stats_lock:
            dropped = dict(self._dropped)
            errors = dict(self._errors)
            power = self._power_w()
        return MetricsSnapshot(
            source=self.source, device_names=list(self.device_names), device_power_w=power,
            model_totals=model_totals, coefficients=coefficients, requests=requests,
            request_energy=hist_energy, energy_per_token=hist_token, steps=steps, dropped=dropped,
            internal_errors=errors, lag_s=lag,
        )

    def _power_w(self) -> list[float | None]:
        rs = self._power_readings
        if len(rs) < 2:
            return []
        a, b = rs[0], rs[-1]
        dt = b.t_s - a.t_s
        if dt <= 0:
            return []
        return [(eb - ea) / dt for ea, eb in zip(a.energy_j, b.energy_j, strict=False)]

    def lookup(self, rid: str) -> RequestResult | None:
        """A request's result: final if settled, provisional while in flight, None if unknown.

        Accepts the engine's request id or the OpenAI response id (``chatcmpl-...``/``cmpl-...``);
        a response id that maps to several engine requests gets their sum.
        """
        with self._lock:
            res = self._lookup_exact(rid)
            if res is not None:
                return res
            parts = [p for p in (self._lookup_exact(e) for e in self._aliases.get(rid, ())) if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return combine_results(rid, parts)

    def _lookup_exact(self, rid: str) -> RequestResult | None:
        res = self._recent.get(rid)
        if res is not None:
            return res
        if self._attributor is not None:
            try:
                return self._attributor.provisional(rid)
            except Exception:  # noqa: BLE001
                self._fail("lookup", "provisional lookup failed")
        return None

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        with self._stats_lock:
            last = self._last_reading_t
            messages = self._messages
        threads_ok = all(t is not None and t.is_alive() for t in (self._recv_thread, self._worker_thread))
        meter_ok = last is not None and now - last < 5.0
        with self._lock:
            detail = {
                "model": self._model,
                "unsupported_model": self._unsupported,
                "attributing": self._attributor is not None,
                "source": self.source,
                "meter_reading_age_s": None if last is None else round(now - last, 3),
                "messages": messages,
                "hellos": self._hellos,
                "steps": self._steps,
                "lag_s": self._lag_s,
                "address": self.address,
            }
        starting = self._t_started is not None and now - self._t_started < 5.0
        ok = threads_ok and not self._stop.is_set() and (meter_ok or starting)
        return ok, detail


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead sidecar; refuse if one is still listening or it is not a socket."""
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


# ------------------------------------------------------------------------------------------ CLI
def add_sidecar_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--meter", choices=METER_CHOICES, default="auto",
                        help="energy meter (default: auto - NVML if a GPU is visible, else RAPL, else CPU time)")
    parser.add_argument("--socket", default=None, metavar="PATH",
                        help=f"socket the engine hook sends to (default: ${transport.ENV_SIDECAR} or "
                             f"{transport.DEFAULT_SOCKET})")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics (default: 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, default=9464, help="port of /metrics (0: any free port; default 9464)")
    parser.add_argument("--ledger", default=None, metavar="PATH",
                        help="append one JSON line per finished request to PATH")
    parser.add_argument("--hardware", default=None, metavar="NAME|PATH",
                        help="hardware profile (default: chosen from the meter's devices)")
    parser.add_argument("--window-s", type=float, default=2.0, help="attribution window in seconds (default 2)")
    return parser


def _open_meter(name: str) -> Meter:
    from wattprint.profiler.meters.auto import open_meter

    return open_meter(name)


def run_sidecar(args: argparse.Namespace, *, ready: Callable[[Sidecar], None] | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code. Raises InputError/ConfigError/MeterError
    (the CLI maps them to exit code 2)."""
    if args.window_s <= 0:
        raise ConfigError(f"--window-s must be positive, got {args.window_s}")
    if not (0 <= args.metrics_port <= 65535):
        raise ConfigError(f"--metrics-port must be 0-65535, got {args.metrics_port}")
    meter = _open_meter(args.meter)
    stop = threading.Event()
    previous = {}

    def handler(signum, frame):
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        with Sidecar(meter, socket_path=args.socket, metrics_host=args.metrics_host,
                     metrics_port=args.metrics_port, ledger_path=args.ledger, hardware=args.hardware,
                     window_s=args.window_s) as sidecar:
            print(f"wattprint sidecar: hook address {sidecar.address} "
                  f"(export {transport.ENV_SIDECAR}={sidecar.address} for the engine)", flush=True)
            print(f"wattprint sidecar: metrics {sidecar.metrics_url}/metrics, meter {sidecar.source}, "
                  f"hardware {sidecar.profile.name}"
                  + (f", ledger {args.ledger}" if args.ledger else ""), flush=True)
            if ready is not None:
                ready(sidecar)
            while not stop.wait(0.5):
                pass
            print("wattprint sidecar: stopping (settling the last windows)", flush=True)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        try:
            meter.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the meter failed")
    return 0
