"""The attributor driver: feeds the online attributor of the current engine session and hands what it
settles to the sinks.

The attributor is created when the first ``Hello`` arrives (geometry from its ``model_config``). A
``Hello`` from another engine process finishes the current attributor and starts a new one; the totals of
earlier attributors are kept per model (:func:`add_totals`), so the exported counters carry on. Steps
that arrive before any Hello are counted as ``no_hello``, except those from the engine process whose
Hello a previous sidecar saved (:class:`~wattprint.profiler.sidecar.sessions.HelloFile`): that Hello
is reused.

Every method takes the sidecar's lock (``lock``, re-entrant) around the attributor; exceptions raised by
the attributor are counted and logged through ``stats`` and never escape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from wattprint.errors import InputError
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.sidecar.sessions import EngineSession, HelloFile, session_key
from wattprint.profiler.sidecar.sinks import Sinks, StepObserver
from wattprint.profiler.sidecar.stats import Counters
from wattprint.profiler.transport import messages as transport

log = logging.getLogger(__name__)


def _add_nested(x: dict, y: dict) -> dict:
    out = {k: dict(v) for k, v in x.items()}
    for k, v in y.items():
        d = out.setdefault(k, {})
        for kk, vv in v.items():
            d[kk] = d.get(kk, 0.0) + vv
    return out


def _add_flat(x: dict, y: dict) -> dict:
    out = dict(x)
    for k, v in y.items():
        out[k] = out.get(k, 0.0) + v
    return out


def add_totals(a: Totals, b: Totals) -> Totals:
    """Elementwise sum of two cumulative totals (``b``'s source and coefficients win)."""
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
        energy_j_by_phase_stratum=_add_nested(a.energy_j_by_phase_stratum, b.energy_j_by_phase_stratum),
        kv_j_by_stratum=_add_flat(a.kv_j_by_stratum, b.kv_j_by_stratum),
        tokens_by_phase_stratum=_add_nested(a.tokens_by_phase_stratum, b.tokens_by_phase_stratum),
        kv_read_bytes=a.kv_read_bytes + b.kv_read_bytes,
        kv_write_bytes=a.kv_write_bytes + b.kv_write_bytes,
    )


class AttributionDriver:
    """One engine session at a time, its attributor, and the per-model totals of earlier ones.

    ``factory(geometry, profile, *, n_devices, source, model_name, window_s)`` makes an attributor
    (the :class:`~wattprint.profiler.attribution.online.OnlineAttributor` contract);
    ``recent_readings()`` returns the readings just before now, given to a new attributor because steps
    may start before their engine's Hello arrives.
    """

    def __init__(self, profile: HardwareProfile, *, source: str, n_devices: int, window_s: float,
                 factory: Callable, stats: Counters, sinks: Sinks, lock: threading.RLock,
                 recent_readings: Callable[[], list[Reading]], hello_file: HelloFile | None = None,
                 step_observers: Sequence[StepObserver] = ()):
        self.profile, self.source, self.n_devices, self.window_s = profile, source, n_devices, window_s
        self._factory, self._stats, self._sinks, self.lock = factory, stats, sinks, lock
        self._recent_readings, self.hello_file, self._observers = recent_readings, hello_file, list(step_observers)
        # under lock
        self.session: EngineSession | None = None
        self.attributor = None
        self.base_totals: dict[str, Totals] = {}
        self.steps = 0
        self.hellos = 0
        self.lag_s: float | None = None
        #: the Hello a previous sidecar saved (:meth:`resume`), until this one hears a Hello
        self.resume_hello: transport.Hello | None = None

    # ------------------------------------------------------------------------------- sessions
    def resume(self) -> None:
        """A restarted sidecar may receive steps before the hook says Hello again: remember the last Hello
        the previous sidecar saw, to be used for steps from the same engine process (pid)."""
        hello = self.hello_file.load() if self.hello_file is not None else None
        with self.lock:
            self.resume_hello = hello

    def on_hello(self, hello: transport.Hello) -> None:
        key = session_key(hello)
        with self.lock:
            self.hellos += 1
            self.resume_hello = None
            old = self.session
            if old is not None and old.key == key and (self.attributor is not None or not old.supported):
                return  # the same engine again (the hook reconnected)
            current = self.attributor
        if current is not None:
            log.warning("wattprint sidecar: Hello from pid %d (model %r) replaces pid %s (model %r); settling "
                        "the old engine's requests", hello.pid, hello.model, old.pid, old.model)
            self.finish()
        session = EngineSession.from_hello(hello)
        if not session.supported:
            with self.lock:
                self.session = session
            self._save_hello(hello)
            self._stats.count_error("unsupported_model")
            log.error("wattprint sidecar: model %r cannot be modelled (%s); its steps will be dropped and counted "
                      "in wattprint_dropped_records_total{reason=\"unsupported_model\"}", hello.model, session.error)
            return
        if hello.tensor_parallel_size != self.n_devices:
            log.warning("wattprint sidecar: the engine uses %d device(s) but the meter reads %d; all metered "
                        "devices are attributed", hello.tensor_parallel_size, self.n_devices)
        att = self._factory(session.geometry, self.profile, n_devices=self.n_devices, source=self.source,
                            model_name=hello.model, window_s=self.window_s)
        with self.lock:
            for r in self._recent_readings():
                self._feed_reading(att, r)
            self.attributor = att
            self.session = session
        self._save_hello(hello)
        log.info("wattprint sidecar: attributing model %r (%s, pid %d, %s %s)", hello.model, session.geometry.name,
                 hello.pid, hello.engine, hello.engine_version)

    def _save_hello(self, hello: transport.Hello) -> None:
        if self.hello_file is None:
            return
        try:
            self.hello_file.save(hello)
        except OSError:
            self._stats.fail("hello_file", "cannot save the engine's Hello to %s", self.hello_file.path)

    @property
    def unsupported_model(self) -> str | None:
        """The model of the last Hello that could not be modelled (None once one could)."""
        s = self.session
        return s.model if s is not None and not s.supported else None

    # ---------------------------------------------------------------------------------- input
    def on_steps(self, msg: transport.Steps) -> None:
        with self.lock:
            resume = self.resume_hello
            need = self.attributor is None and self.unsupported_model is None
        if need and resume is not None and resume.pid == msg.pid:
            log.info("wattprint sidecar: steps from pid %d arrived before any Hello; resuming with the Hello "
                     "it sent to the previous sidecar (model %r)", msg.pid, resume.model)
            self.on_hello(resume)
        with self.lock:
            att = self.attributor
            if att is None:
                self._stats.count_drop("unsupported_model" if self.unsupported_model else "no_hello",
                                       len(msg.records))
                return
            for rec in msg.records:
                try:
                    att.add_step(rec)
                except InputError as exc:
                    self._stats.count_drop("invalid")
                    self._stats.warn("invalid", "step %s rejected: %s", rec.step, exc)
                    continue
                except Exception:  # noqa: BLE001
                    self._stats.count_drop("internal_error")
                    self._stats.fail("step", "attributor failed on step %s", rec.step)
                    continue
                self.steps += 1
                for obs in self._observers:
                    try:
                        obs.observe_step(rec, self.session.geometry)
                    except Exception:  # noqa: BLE001
                        self._stats.fail(obs.where, "%s failed on step %s", type(obs).__name__, rec.step)

    def add_reading(self, reading: Reading) -> None:
        with self.lock:
            if self.attributor is not None:
                self._feed_reading(self.attributor, reading)

    def _feed_reading(self, att, reading: Reading) -> None:
        try:
            att.add_reading(reading)
        except Exception:  # noqa: BLE001
            self._stats.fail("reading", "a meter reading could not be attributed")

    # ------------------------------------------------------------------------------- settling
    def advance(self, now_s: float) -> None:
        """Settle the complete energy windows; their final requests go to the sinks."""
        with self.lock:
            att = self.attributor
            if att is None:
                return
            try:
                results = att.advance(now_s)
            except Exception:  # noqa: BLE001
                self._stats.fail("advance", "attribution advance failed")
                return
            try:
                self.lag_s = float(att.lag_s(now_s))
            except Exception:  # noqa: BLE001
                self._stats.fail("advance", "attribution lag failed")
            self._publish(results)
        self._sinks.deliver(results, blocking=True)

    def finish(self) -> None:
        """Settle everything of the current attributor (engine change or shutdown), fold its totals into
        its model's, and forget it."""
        with self.lock:
            att = self.attributor
            if att is None:
                return
            try:
                results = att.finish()
            except Exception:  # noqa: BLE001
                self._stats.fail("advance", "attribution finish failed")
                results = []
            self._publish(results)
            try:
                self._fold(self.base_totals, att.totals())
            except Exception:  # noqa: BLE001
                self._stats.fail("advance", "attribution totals failed")
            self.attributor = None  # a Hello with the same key now starts a new one
            self.lag_s = None
        self._sinks.deliver(results, blocking=True)

    def _publish(self, results: list[RequestResult]) -> None:
        """Name the model of each result and hand them to the in-memory sinks (caller holds the lock)."""
        model = self.session.model if self.session is not None else None
        for res in results:
            if res.model is None and model is not None:
                res.model = model
        self._sinks.deliver(results, blocking=False)

    def _fold(self, into: dict[str, Totals], t: Totals) -> None:
        model = self.session.model if self.session is not None else ""
        into[model] = add_totals(into[model], t) if model in into else t

    # -------------------------------------------------------------------------------- reading
    def totals(self) -> tuple[dict[str, Totals], dict]:
        """(cumulative totals per model, the current coefficients), the live attributor included."""
        with self.lock:
            model_totals = dict(self.base_totals)
            coefficients: dict = {}
            if self.attributor is not None:
                try:
                    t = self.attributor.totals()
                except Exception:  # noqa: BLE001
                    self._stats.fail("scrape", "attribution totals failed")
                    t = None
                if t is not None:
                    self._fold(model_totals, t)
                    coefficients = dict(t.coefficients or {})
            elif model_totals:
                coefficients = dict(list(model_totals.values())[-1].coefficients or {})
            return model_totals, coefficients

    def describe(self) -> dict:
        """The session and progress, for ``/healthz``."""
        with self.lock:
            return {"model": self.session.model if self.session is not None else None,
                    "unsupported_model": self.unsupported_model, "attributing": self.attributor is not None,
                    "hellos": self.hellos, "steps": self.steps, "lag_s": self.lag_s}

    def provisional(self, rid: str) -> RequestResult | None:
        """A request still in the attributor (settled as far as it goes), or None."""
        with self.lock:
            if self.attributor is None:
                return None
            try:
                return self.attributor.provisional(rid)
            except Exception:  # noqa: BLE001
                self._stats.fail("lookup", "provisional lookup failed")
                return None
