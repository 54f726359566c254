"""The sidecar: receives step records from the engine hook, attributes measured energy online, and
exports it (Prometheus ``/metrics``, ``/v1/requests/{id}``, the request ledger).

:class:`Sidecar` only wires the parts and runs their threads, none of which waits on another's slow work:

* **receive** - :class:`~wattprint.profiler.transport.receiver.Receiver`: a ZeroMQ ``PULL`` socket bound
  on ``ipc://PATH`` (mode 0600; by default in the private runtime directory,
  :func:`~wattprint.profiler.transport.messages.runtime_dir`, created 0700) filling a queue bounded in
  messages, entries and bytes; drops are counted in ``wattprint_dropped_records_total{reason}``
  (``queue_full``, ``decode_error``, ``hook_queue_full``, and the driver's reasons).
* **timeline** - polls the meter (``EnergyTimeline``) and hands each reading to the driver.
* **worker** - drains the queue into the :class:`~wattprint.profiler.sidecar.driver.AttributionDriver`
  and, every ``advance_interval_s``, settles the complete energy windows up to the receive time of the
  oldest message still queued (time whose records have not been read is never settled as idle); the
  requests that became final go to the sinks (:mod:`wattprint.profiler.sidecar.sinks`: the
  recent-results store read by ``/v1/requests/{id}``, the histograms, the ledger). The lag gauge is the
  larger of the attributors' lag and the age of the oldest queued message.
* **lookup** - the middleware's questions for the records of the answers it sends, over ZeroMQ on
  ``ipc://PATH.lookup`` beside the step socket (same private directory, 0600; the signed URL's
  credential checked as by the HTTP API): :mod:`~wattprint.profiler.sidecar.lookup`.
* **http** - the metrics server (bounded pool, deadlines: :mod:`wattprint.exporters.api`); each scrape
  reads one snapshot under the sidecar's lock; records are read through signed per-request URLs or with
  the operator token (:mod:`~wattprint.profiler.sidecar.access`), ``/openapi.json`` describes the API.

Every exception raised by wattprint code on these threads is logged (rate-limited) and counted in
``wattprint_internal_errors_total{where}``; the sidecar keeps running. A new sidecar on the same path
removes the stale socket file and binds again; ZeroMQ reconnects the hook by itself, and the last
Hellos kept next to the socket (``PATH.hello``, private) let it attribute those engines' steps before
their hooks say Hello again. The ledger skips final (engine, id) pairs it already holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from wattprint.errors import ConfigError
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.exporters.ledger import Ledger
from wattprint.exporters.prometheus import make_registry
from wattprint.profiler.core.hardware import HardwareProfile, load_profile
from wattprint.profiler.meters.base import Meter, Reading
from wattprint.profiler.sidecar import access, paths
from wattprint.profiler.sidecar.defaults import default_attributor, default_hardware, default_timeline
from wattprint.profiler.sidecar.driver import AttributionDriver
from wattprint.profiler.sidecar.httpapi import OPENAPI, RequestAccess
from wattprint.profiler.sidecar.lookup import LookupServer, lookup_address
from wattprint.profiler.sidecar.sessions import HelloFile, ModelLabels
from wattprint.profiler.sidecar.sinks import (
    LedgerSink,
    RecentResults,
    RequestHistograms,
    SimulatedLoad,
    Sinks,
    record_name,
)
from wattprint.profiler.sidecar.stats import Counters, PowerWindow
from wattprint.profiler.sidecar.views import Views
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.receiver import MessageQueue, Receiver

log = logging.getLogger(__name__)

_BATCH_ENTRIES = 50_000  # entries processed between two chances to settle
class Sidecar(Views):
    """Receive, attribute, export. See the module docstring.

    ``metrics_port=0`` binds an ephemeral port (``.metrics_port`` after :meth:`start`); None serves no
    HTTP. ``hardware`` is a profile name or path (default: from the meter, see :func:`default_hardware`).
    ``recorder`` (e.g. :class:`~wattprint.profiler.sidecar.recorder.TraceRecorder`) sees every message and
    reading. ``attributor_factory`` and ``timeline_factory`` exist for tests.
    """

    def __init__(self, meter: Meter, *, socket_path: str | None = None, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = 9464, ledger_path: str | os.PathLike | None = None,
                 ledger_mode: int = 0o600, hardware: str | os.PathLike | HardwareProfile | None = None,
                 window_s: float = 2.0, advance_interval_s: float = 0.25, meter_rate_hz: float = 50.0,
                 queue_entries: int = 256_000, queue_messages: int = 20_000, queue_bytes: int = 32 << 20,
                 recent_results: int = 20_000, alias_capacity: int = 100_000, url_key: bytes | None = None,
                 operator_token: str | None = None, models: tuple[str, ...] | None = None, max_models: int = 16,
                 max_sessions: int = 64, clock: Callable[[], float] = time.monotonic,
                 exit_check_s: float | None = 5.0, recorder=None,
                 attributor_factory: Callable | None = None, timeline_factory: Callable | None = None,
                 collectors=()):
        self.meter = meter
        self.collectors = list(collectors)  # more metric families for /metrics (e.g. the access policy's)
        self.ledger_mode = ledger_mode
        self.exit_check_s = exit_check_s  # how often sessions of exited engines are retired (None: never)
        self.metrics_host = metrics_host
        self._metrics_port_requested = metrics_port
        self.metrics_port: int | None = None
        self.ledger_path = ledger_path
        self.window_s = window_s
        self.advance_interval_s = advance_interval_s
        self.meter_rate_hz = meter_rate_hz
        self.recorder = recorder
        self._timeline_factory = timeline_factory or default_timeline
        self.profile = hardware if isinstance(hardware, HardwareProfile) else \
            load_profile(hardware or default_hardware(meter))
        self.source = getattr(meter, "source", "unknown")
        try:
            self.device_names = [d.name for d in meter.devices]
        except Exception:  # noqa: BLE001
            self.device_names = []

        self.lock = threading.RLock()  # the driver's attributor and the in-memory sinks
        self.stats = Counters()
        self.power = PowerWindow()
        self.queue = MessageQueue(queue_entries, queue_messages, queue_bytes)
        self.receiver = Receiver(transport.address(socket_path), self.queue, self.stats)
        self.address = self.receiver.address
        self.socket_file = self.receiver.socket_file
        self.url_key = url_key
        self.url_key_file: str | None = None  # where the key was read (None when given)
        self.operator_token = operator_token
        self.results = RecentResults(recent_results, alias_capacity, pseudonym=self._pseudonym)
        self.histograms = RequestHistograms(exemplar=lambda r: self._pseudonym(record_name(r)))
        self.sinks = Sinks(self.stats.fail, [self.results, self.histograms])
        observers = []
        if self.source == "simulated" and callable(getattr(meter, "observe", None)):
            observers.append(SimulatedLoad(meter.observe))
        self.hello_file = HelloFile.beside(self.socket_file)
        self.driver = AttributionDriver(
            self.profile, source=self.source, n_devices=len(self.device_names) or 1, window_s=window_s,
            factory=attributor_factory or default_attributor, stats=self.stats, sinks=self.sinks, lock=self.lock,
            recent_readings=self.power.recent, hello_file=self.hello_file, step_observers=observers,
            requests=self.results, labels=ModelLabels(models, max_models), clock=clock, max_sessions=max_sessions)
        self.ledger: Ledger | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._timeline = None
        self._server: MetricsServer | None = None
        self._lookups: LookupServer | None = None
        #: where the middleware asks for records (None: no lookup socket, the HTTP API only)
        self.lookup_address: str | None = None
        self.access: RequestAccess | None = None
        self._started = self._stopped = False
        self._t_started: float | None = None

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> Sidecar:
        if self._started:
            return self
        self._started = True
        self._t_started = time.monotonic()
        try:
            self._prepare_files()
            if self.ledger_path is not None:
                self.ledger = Ledger(self.ledger_path, mode=self.ledger_mode)
                if self.ledger.truncated_bytes:
                    self.stats.count_error("ledger_torn_line")
                self.sinks.add(LedgerSink(self.ledger, self.source))
            self.receiver.bind()
            self.access = RequestAccess(self.url_key, self.operator_token, self.lookup_ref, self.lookup)
            self._serve_lookups()
            self.driver.resume()
            self.receiver.start()
            self._worker = threading.Thread(target=self._worker_loop, name="wattprint-attr", daemon=True)
            self._worker.start()
            self._timeline = self._timeline_factory(self.meter, self.meter_rate_hz, self._on_reading)
            self._timeline.start()
            if self._metrics_port_requested is not None:
                self._serve(self._metrics_port_requested)
        except BaseException:
            self.stop()
            raise
        log.info("wattprint sidecar: receiving on %s, meter %s (%s), hardware %s%s", self.address, self.source,
                 ", ".join(self.device_names) or "no devices", self.profile.name,
                 f", metrics on {self.metrics_url}" if self._server else "")
        return self

    def _prepare_files(self) -> None:
        """The socket's private directory (the default one is created 0700 and checked) and the URL key."""
        if self.url_key is None:
            self.url_key_file = paths.prepare_socket_dir(self.socket_file, transport.runtime_dir())
            self.url_key = paths.load_or_create_key(self.url_key_file)
        else:
            paths.prepare_socket_dir(self.socket_file, transport.runtime_dir())

    def _pseudonym(self, name: str) -> str:
        return access.pseudonym(self.url_key, name) if self.url_key else name

    def _serve_lookups(self) -> None:
        """The lookup socket beside an ``ipc://`` step socket (without one, the HTTP API answers)."""
        where = lookup_address(self.address)
        if where is None:
            return
        try:
            self._lookups = LookupServer(where, self.access, self.lock, self.stats).bind().start()
        except ConfigError as exc:
            log.warning("wattprint sidecar: no lookup socket (%s); the middleware will ask the HTTP API", exc)
            return
        self.lookup_address = where

    def _serve(self, port: int) -> None:
        self.app = app = make_app(make_registry(self.snapshot, self.collectors), self.lookup, self.health,
                                  requests_fn=self.access, openapi=OPENAPI)
        try:
            server = MetricsServer(app, self.metrics_host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.metrics_host}:{port}: {exc.strerror or exc}") from exc
        self._server = server.start()
        self.metrics_port = self._server.port

    def health(self) -> tuple[bool, dict]:
        """:meth:`Views.health`, with the lookup socket's thread and how many questions it answered."""
        ok, detail = super().health()
        if self._lookups is not None:
            alive = self._lookups.is_alive()
            detail["lookups"] = {"ok": alive, "address": self.lookup_address, **self._lookups.counts}
            ok = ok and (alive or self._stop.is_set())
        return ok, detail

    @property
    def metrics_url(self) -> str | None:
        return self._server.url if self._server else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def stop(self) -> None:
        """Stop receiving, attribute what was received, settle everything (``finish()``), close the
        ledger, stop the HTTP server. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.queue.wake()
        self.receiver.stop()
        if self._lookups is not None:
            self._lookups.stop()
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self._timeline is not None:
            try:
                self._timeline.stop()
            except Exception:  # noqa: BLE001
                self.stats.fail("timeline", "stopping the meter timeline failed")
            try:  # one last reading, so that the final windows reach as close to now as possible
                self._on_reading(self.meter.read())
            except Exception:  # noqa: BLE001
                self.stats.fail("reading", "the last meter reading failed")
        # the worker has exited: this thread owns the queue now
        try:
            self._process(self.queue.get_all(0))
        except Exception:  # noqa: BLE001
            self.stats.fail("step", "processing queued messages at shutdown failed")
        self.driver.finish()
        if self.ledger is not None:
            try:
                self.ledger.close()
            except Exception:  # noqa: BLE001
                self.stats.fail("ledger", "closing the ledger failed")
        if self._server is not None:
            self._server.stop()

    # ---------------------------------------------------------------------------------- worker
    def _worker_loop(self) -> None:
        next_advance = time.monotonic() + self.advance_interval_s
        next_check = time.monotonic() + (self.exit_check_s or 0.0)
        while not self._stop.is_set():
            try:
                self._process(self.queue.get_some(max(0.0, next_advance - time.monotonic()), _BATCH_ENTRIES))
                now = time.monotonic()
                if now >= next_advance:
                    self.driver.advance(now, self.queue.oldest_t())
                    next_advance = now + self.advance_interval_s
                if self.exit_check_s is not None and now >= next_check:
                    self.driver.retire_exited()
                    next_check = now + self.exit_check_s
            except Exception:  # noqa: BLE001 - the worker must survive anything
                self.stats.fail("worker", "worker loop error")
                time.sleep(0.05)

    def _process(self, items: list) -> None:
        for msg, _t, gap in items:
            try:
                if self.recorder is not None:
                    self.recorder.add_message(msg)
                if isinstance(msg, transport.Hello):
                    self.driver.on_hello(msg)
                else:
                    self.driver.on_steps(msg, gap)
            except Exception:  # noqa: BLE001
                self.stats.count_drop("internal_error", len(getattr(msg, "records", ())) or 0)
                self.stats.fail("step", "processing a %s message failed", type(msg).__name__)

    def _on_reading(self, reading: Reading) -> None:
        """Timeline callback (meter thread)."""
        try:
            self.power.add(reading)
            if self.recorder is not None:
                self.recorder.add_reading(reading)
            self.driver.add_reading(reading)
        except Exception:  # noqa: BLE001
            self.stats.fail("reading", "a meter reading could not be attributed")
