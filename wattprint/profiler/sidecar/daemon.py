"""The sidecar: receives step records from the engine hook, attributes measured energy online, and
exports it (Prometheus ``/metrics``, ``/v1/requests/{id}``, the request ledger).

:class:`Sidecar` only wires the parts and runs their threads, none of which waits on another's slow work:

* **receive** - :class:`~wattprint.profiler.transport.receiver.Receiver`: a ZeroMQ ``PULL`` socket bound
  on ``ipc://PATH`` (mode 0600) filling a bounded queue; drops are counted in
  ``wattprint_dropped_records_total{reason}`` (``queue_full``, ``decode_error``, ``hook_queue_full``).
* **timeline** - polls the meter (``EnergyTimeline``) and hands each reading to the driver.
* **worker** - drains the queue into the :class:`~wattprint.profiler.sidecar.driver.AttributionDriver`
  and, every ``advance_interval_s``, settles the complete energy windows; the requests that became final
  go to the sinks (:mod:`wattprint.profiler.sidecar.sinks`: the recent-results store read by
  ``/v1/requests/{id}``, the histograms, the ledger) and the attributor forgets them.
* **http** - the metrics server; each scrape reads one snapshot under the sidecar's lock.

Every exception raised by wattprint code on these threads is logged (rate-limited) and counted in
``wattprint_internal_errors_total{where}``; the sidecar keeps running. A new sidecar on the same path
removes the stale socket file and binds again; ZeroMQ reconnects the hook by itself, and the last
``Hello`` kept next to the socket (``PATH.hello``) lets it attribute that engine's steps before the hook
says Hello again. The ledger skips final ids it already holds.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable

from wattprint.errors import ConfigError
from wattprint.exporters.api import MetricsServer, make_app
from wattprint.exporters.ledger import Ledger
from wattprint.exporters.prometheus import MetricsSnapshot, make_registry
from wattprint.profiler.core.hardware import HardwareProfile, load_profile
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.meters.base import Meter, Reading
from wattprint.profiler.sidecar.driver import AttributionDriver
from wattprint.profiler.sidecar.sessions import HelloFile
from wattprint.profiler.sidecar.sinks import (
    LedgerSink,
    RecentResults,
    RequestHistograms,
    SimulatedLoad,
    Sinks,
)
from wattprint.profiler.sidecar.stats import Counters, PowerWindow
from wattprint.profiler.transport import messages as transport
from wattprint.profiler.transport.receiver import MessageQueue, Receiver

log = logging.getLogger(__name__)

_NVML_PROFILES = ((r"h200", "h200"), (r"h100", "h100-sxm"), (r"a100", "a100-sxm"), (r"\bl4\b", "l4"))


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
        return next((profile for pattern, profile in _NVML_PROFILES if re.search(pattern, names)), "h100-sxm")
    return "cpu"


def default_attributor(geometry, profile, *, n_devices, source, model_name, window_s):
    from wattprint.profiler.attribution.online import OnlineAttributor

    return OnlineAttributor(geometry, profile, n_devices=n_devices, source=source, model_name=model_name,
                            window_s=window_s)


def default_timeline(meter, rate_hz, on_reading):
    from wattprint.profiler.timeline.sampler import EnergyTimeline

    return EnergyTimeline(meter, rate_hz=rate_hz, on_reading=on_reading)


class Sidecar:
    """Receive, attribute, export. See the module docstring.

    ``metrics_port=0`` binds an ephemeral port (``.metrics_port`` after :meth:`start`); None serves no
    HTTP. ``hardware`` is a profile name or path (default: from the meter, see :func:`default_hardware`).
    ``recorder`` (e.g. :class:`~wattprint.profiler.sidecar.recorder.TraceRecorder`) sees every message and
    reading. ``attributor_factory`` and ``timeline_factory`` exist for tests.
    """

    def __init__(self, meter: Meter, *, socket_path: str | None = None, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = 9464, ledger_path: str | os.PathLike | None = None,
                 hardware: str | os.PathLike | HardwareProfile | None = None, window_s: float = 2.0,
                 advance_interval_s: float = 0.25, meter_rate_hz: float = 50.0, queue_records: int = 100_000,
                 queue_messages: int = 10_000, recent_results: int = 20_000, alias_capacity: int = 100_000,
                 recorder=None, attributor_factory: Callable | None = None,
                 timeline_factory: Callable | None = None):
        self.meter = meter
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
        self.queue = MessageQueue(queue_records, queue_messages)
        self.receiver = Receiver(transport.address(socket_path), self.queue, self.stats)
        self.address = self.receiver.address
        self.socket_file = self.receiver.socket_file
        self.results = RecentResults(recent_results, alias_capacity)
        self.histograms = RequestHistograms()
        self.sinks = Sinks(self.stats.fail, [self.results, self.histograms])
        observers = [self.results]
        if self.source == "simulated" and callable(getattr(meter, "observe", None)):
            observers.append(SimulatedLoad(meter.observe))
        self.hello_file = HelloFile.beside(self.socket_file)
        self.driver = AttributionDriver(
            self.profile, source=self.source, n_devices=len(self.device_names) or 1, window_s=window_s,
            factory=attributor_factory or default_attributor, stats=self.stats, sinks=self.sinks, lock=self.lock,
            recent_readings=self.power.recent, hello_file=self.hello_file, step_observers=observers)
        self.ledger: Ledger | None = None
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._timeline = None
        self._server: MetricsServer | None = None
        self._started = self._stopped = False
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
                    self.stats.count_error("ledger_torn_line")
                self.sinks.add(LedgerSink(self.ledger, self.source))
            self.receiver.bind()
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

    def _serve(self, port: int) -> None:
        app = make_app(make_registry(self.snapshot), self.lookup, self.health)
        try:
            server = MetricsServer(app, self.metrics_host, port)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.metrics_host}:{port}: {exc.strerror or exc}") from exc
        self._server = server.start()
        self.metrics_port = self._server.port

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
        while not self._stop.is_set():
            try:
                self._process(self.queue.get_all(max(0.0, next_advance - time.monotonic())))
                now = time.monotonic()
                if now >= next_advance:
                    self.driver.advance(now)
                    next_advance = now + self.advance_interval_s
            except Exception:  # noqa: BLE001 - the worker must survive anything
                self.stats.fail("worker", "worker loop error")
                time.sleep(0.05)

    def _process(self, items: list) -> None:
        for msg in items:
            try:
                if self.recorder is not None:
                    self.recorder.add_message(msg)
                if isinstance(msg, transport.Hello):
                    self.driver.on_hello(msg)
                else:
                    self.driver.on_steps(msg)
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

    # ---------------------------------------------------------------------------------- reading
    def snapshot(self) -> MetricsSnapshot:
        """Everything a scrape exports, at one instant (the attributor's totals under the lock)."""
        with self.lock:
            model_totals, coefficients = self.driver.totals()
            requests, hist_energy, hist_token = self.histograms.copy()
            steps, lag = self.driver.steps, self.driver.lag_s
        return MetricsSnapshot(
            source=self.source, device_names=list(self.device_names), device_power_w=self.power.power_w(),
            model_totals=model_totals, coefficients=coefficients, requests=requests,
            request_energy=hist_energy, energy_per_token=hist_token, steps=steps, dropped=self.stats.dropped(),
            internal_errors=self.stats.errors(), lag_s=lag,
        )

    def lookup(self, rid: str) -> RequestResult | None:
        """A request's result: final if settled, provisional while in flight, None if unknown.

        Accepts the engine's request id or the OpenAI response id (``chatcmpl-...``/``cmpl-...``);
        a response id that maps to several engine requests gets their sum.
        """
        with self.lock:
            return self.results.lookup(rid, self.driver.provisional)

    def health(self) -> tuple[bool, dict]:
        now = time.monotonic()
        last = self.power.last_t_s
        threads_ok = self.receiver.is_alive() and self._worker is not None and self._worker.is_alive()
        meter_ok = last is not None and now - last < 5.0
        detail = {**self.driver.describe(), "source": self.source,
                  "meter_reading_age_s": None if last is None else round(now - last, 3),
                  "messages": self.stats.messages, "address": self.address}
        starting = self._t_started is not None and now - self._t_started < 5.0
        ok = threads_ok and not self._stop.is_set() and (meter_ok or starting)
        return ok, detail
