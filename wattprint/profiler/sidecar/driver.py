"""The attributor driver: one online attributor per engine session, fed only what passed the checks of
:mod:`~wattprint.profiler.sidecar.ingest`, and what they settle handed to the sinks.

* Sessions (:mod:`~wattprint.profiler.sidecar.sessions`) start with their Hello; steps are routed by
  session and never touch another session's state. Steps of an unknown session are counted as
  ``no_hello``, unless a previous sidecar (or this one, before the session was retired) saved its Hello.
* Devices: a Hello naming its devices owns them (a session that took every free device without naming
  any gives them up, its attributor settled and started again on what is left); a Hello naming none
  takes every device no other session holds. Devices are freed when their session's process exits.
  A session left without a device is ``unmetered`` (its steps counted as ``no_device``); one whose model
  the cost model cannot describe is ``unsupported``: its devices' energy is all idle (conservation holds),
  its steps are counted as ``unsupported_model``.
* Losses: rejected records (by kind), steps whose time was already settled (``late``), and records lost
  before they arrived (the receiver's ``gap`` flag, step numbers that skip) mark the session's requests
  in flight where the loss happened (a loss inside a batch: the records before it are added first);
  their results are emitted ``incomplete`` with ``missing`` saying what is missing.

* Load: a message's accepted records (consecutive messages of one engine join in the receive queue) go
  to the attributor at once (``add_steps``, with the entry columns the checks extracted once:
  :class:`~wattprint.profiler.attribution.pending.EntryColumns`); new requests are found once per id
  and batch; Python work is per step and per new request, per-entry work one pass per column.
* History: the summed totals are kept by settled time (:meth:`AttributionDriver.totals_since`), so that a
  window's figures (a workload without the server's start-up) can be read.

Every method takes the sidecar's lock (``lock``, re-entrant) around the attributors; exceptions raised
by an attributor are counted and logged through ``stats`` and never escape.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import chain

from wattprint.errors import InputError
from wattprint.profiler.attribution.entries import EntryColumns
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.sidecar.ingest import (
    Strata,
    check_records,
    first_sightings,
    loss_points,
    runs_between,
)
from wattprint.profiler.sidecar.seating import Seating
from wattprint.profiler.sidecar.sessions import EngineSession, HelloFile, ModelLabels
from wattprint.profiler.sidecar.sinks import EngineResult, Sinks, StepObserver
from wattprint.profiler.sidecar.stats import Counters
from wattprint.profiler.sidecar.totals import TotalsHistory, add_totals, on_devices
from wattprint.profiler.transport import messages as transport

__all__ = ["AttributionDriver", "add_totals"]
log = logging.getLogger(__name__)


class AttributionDriver(Seating):
    """The engine sessions, their attributors and the per-model totals of retired ones.

    ``factory(geometry, profile, *, n_devices, source, model_name, window_s)`` makes an attributor (the
    :class:`~wattprint.profiler.attribution.online.OnlineAttributor` contract); ``recent_readings()``
    returns the readings just before now, given to a new attributor. ``requests`` (the recent-results
    store) learns each request once, when it first appears."""

    def __init__(self, profile: HardwareProfile, *, source: str, n_devices: int, window_s: float,
                 factory: Callable, stats: Counters, sinks: Sinks, lock: threading.RLock,
                 recent_readings: Callable[[], list[Reading]], hello_file: HelloFile | None = None,
                 step_observers: Sequence[StepObserver] = (), requests=None, labels: ModelLabels | None = None,
                 clock: Callable[[], float] = time.monotonic, max_sessions: int = 64, max_age_s: float = 600.0,
                 max_ahead_s: float = 1.0, quiet_s: float = 60.0):
        self.profile, self.source, self.n_devices, self.window_s = profile, source, max(1, n_devices), window_s
        self._factory, self._stats, self._sinks, self.lock = factory, stats, sinks, lock
        self._recent_readings, self.hello_file, self._observers = recent_readings, hello_file, list(step_observers)
        self._requests, self.labels, self.clock = requests, labels or ModelLabels(), clock
        self.max_sessions, self.max_age_s, self.max_ahead_s, self.quiet_s = max_sessions, max_age_s, max_ahead_s, quiet_s
        self.strata = Strata()
        # under lock
        self.sessions: OrderedDict[str, EngineSession] = OrderedDict()
        self.saved: OrderedDict[str, transport.Hello] = OrderedDict()  # Hellos of engines without a session
        self.base_totals: dict[str, Totals] = {}
        self.steps = self.hellos = 0
        self.lag_s: float | None = None
        self._outbox: list[RequestResult] = []  # published, not yet handed to the blocking sinks
        self.history = TotalsHistory()  # the summed totals by settled time (totals_since)

    # ---------------------------------------------------------------------------------- input
    def on_steps(self, msg: transport.Steps, gap: bool = False) -> None:
        key = transport.session_key(msg)
        with self.lock:
            s = self.sessions.get(key)
            saved = self.saved.get(key) if s is None else None
        if saved is not None:
            log.info("wattprint sidecar: steps from pid %d before its Hello; resuming with its saved Hello "
                     "(model %r)", msg.pid, saved.model)
            self.on_hello(saved)
        with self.lock:
            s = self.sessions.get(key)
            if s is None:
                self._stats.count_drop("no_hello", len(msg.records))
                return
            s.last_seen = time.monotonic()
            prev = s.prev
            checked = check_records(msg.records, prev, self.clock(), max_age_s=self.max_age_s,
                                    max_ahead_s=self.max_ahead_s)
            s.prev, accepted = checked.prev, checked.accepted
            for kind, problem, step in checked.rejected:
                self._stats.count_drop(kind)
                self._stats.warn(kind, "step %s rejected: %s", step, problem)
            losses = loss_points(checked, prev, gap)
            if s.attributor is None or s.geometry is None:
                if losses:
                    s.note_gap()
                self._stats.count_drop("no_device" if s.geometry is not None else "unsupported_model", len(accepted))
                return
            self._add_records(s, accepted, checked.entries, losses)

    def _add_records(self, s: EngineSession, accepted: list, entries, losses: list[int]) -> None:
        """The accepted records to the attributor, the session's requests in flight marked as missing
        records where records were lost (``losses``: before ``accepted[k]``)."""
        batched = callable(getattr(s.attributor, "add_steps", None))
        for a, b, lost in runs_between(len(accepted), losses):
            if lost:
                s.note_gap()
            if not batched:  # an attributor that takes steps one by one
                for rec in accepted[a:b]:
                    self._add_step(s, rec)
            elif b > a:
                self._add_batch(s, accepted[a:b], entries if b - a == len(accepted) else entries.select(range(a, b)))

    def _add_batch(self, s: EngineSession, recs: list, entries=None) -> None:
        """A message's accepted records to the session's attributor at once (per-entry work in C loops;
        Python work per new request). Strata are normalised when a request's record takes one."""
        reqs = entries.entries if isinstance(entries, EntryColumns) else list(chain.from_iterable(r.requests for r in recs))
        new = first_sightings(reqs, s.live)
        if new:
            s.note_new(new)
            if self._requests is not None:
                self._requests.note_new(s.key, new)
        try:
            added = s.attributor.add_steps(recs, stratum_of=self.strata, entries=entries)
        except Exception:  # noqa: BLE001
            self._stats.count_drop("internal_error", len(recs))
            self._stats.fail("step", "attributor failed on steps %s-%s", recs[0].step, recs[-1].step)
            s.note_gap()
            return
        for i, problem in added.invalid:
            self._stats.count_drop("invalid_order")
            self._stats.warn("invalid", "step %s rejected: %s", recs[i].step, problem)
        if added.invalid:
            s.note_gap()
        if added.late:  # their time was already settled (as idle)
            self._stats.count_drop("late", len(added.late))
            for i in added.late:
                for e in recs[i].requests:
                    s.missing.setdefault(e.id, "steps")
        self.steps += len(added.accepted)
        s.steps += len(added.accepted)
        for obs in self._observers:
            for i in added.accepted:
                try:
                    obs.observe_step(recs[i], s.geometry)
                except Exception:  # noqa: BLE001
                    self._stats.fail(obs.where, "%s failed on step %s", type(obs).__name__, recs[i].step)

    def _add_step(self, s: EngineSession, rec) -> None:
        att, live, strata = s.attributor, s.live, self.strata
        known = strata.cache.get
        new = []
        for e in rec.requests:  # one pass: ids and strata replaced by one shared string each (memory)
            rid = live.get(e.id)
            if rid is None:
                new.append(e)
            else:
                e.id = rid
            st = e.stratum
            if st is not None:
                e.stratum = known(st) or strata(st)
        if new:
            s.note_new(new)
            if self._requests is not None:
                self._requests.note_new(s.key, new)
        late = getattr(att, "late_steps", 0)
        try:
            att.add_step(rec)
        except InputError as exc:
            self._stats.count_drop("invalid_order")
            self._stats.warn("invalid", "step %s rejected: %s", rec.step, exc)
            s.note_gap()
            return
        except Exception:  # noqa: BLE001
            self._stats.count_drop("internal_error")
            self._stats.fail("step", "attributor failed on step %s", rec.step)
            s.note_gap()
            return
        if getattr(att, "late_steps", 0) != late:  # its time was already settled (as idle)
            self._stats.count_drop("late")
            for e in rec.requests:
                s.missing.setdefault(e.id, "steps")
            return
        self.steps += 1
        s.steps += 1
        for obs in self._observers:
            try:
                obs.observe_step(rec, s.geometry)
            except Exception:  # noqa: BLE001
                self._stats.fail(obs.where, "%s failed on step %s", type(obs).__name__, rec.step)

    def add_reading(self, reading: Reading) -> None:
        with self.lock:
            for s in self.sessions.values():
                if s.attributor is not None:
                    self._feed_reading(s.attributor, s, reading)

    def _feed_reading(self, att, s: EngineSession, reading: Reading) -> None:
        try:
            if len(s.devices) != len(reading.energy_j) or list(s.devices) != list(range(len(s.devices))):
                reading = Reading(reading.t_s, tuple(reading.energy_j[d] for d in s.devices), reading.source)
            att.add_reading(reading)
        except Exception:  # noqa: BLE001
            self._stats.fail("reading", "a meter reading could not be attributed")

    # ------------------------------------------------------------------------------- settling
    def advance(self, now_s: float, settle_until_s: float | None = None) -> None:
        """Settle the complete energy windows up to ``settle_until_s`` (default ``now_s``; earlier while
        records received before now still wait in the queue); final requests go to the sinks."""
        until = now_s if settle_until_s is None else min(now_s, settle_until_s)
        with self.lock:
            lags = []
            for s in list(self.sessions.values()):
                att = s.attributor
                if att is None:
                    continue
                try:
                    results = att.advance(until, self._note_history)
                    lags.append(float(att.lag_s(now_s)))
                except Exception:  # noqa: BLE001
                    self._stats.fail("advance", "attribution advance failed")
                    continue
                self._publish(s, results)
            self.lag_s = max(lags) if lags else None
            self._note_history()
        self.flush()

    def _note_history(self) -> None:
        """Add the summed totals to the history when every settling session has settled further."""
        ends = [t for t in (getattr(s.attributor, "settled_until_s", None) for s in self.sessions.values())
                if t is not None]
        if not ends or (len(self.history) and min(ends) <= self.history.last_t_s):
            return
        model_totals, _ = self.totals()
        tots = list(model_totals.values())
        total = tots[0]
        for t in tots[1:]:
            total = add_totals(total, t)
        self.history.note(min(ends), total, total.t_start)

    def totals_since(self, t_s: float) -> dict[str, float] | None:
        """The summed totals of every engine (measured, attributed, idle, extrapolated, prefill, decode,
        KV and the components' joules, requests, steps) settled after ``t_s``: the latest totals minus
        those settled up to ``t_s``, for a window without the server's start-up. The history keeps a
        point at each settlement (time: the earliest settled-until of the engines' attributors, so that
        every part of a point is settled that far), at most 4,096 of them; between two points the totals
        are interpolated linearly; before the first point they are 0; a ``t_s`` older than the oldest
        point kept counts from that point. ``t_from_s``/``t_to_s`` give the span covered. None before
        the first settlement. See :meth:`TotalsHistory.since`."""
        with self.lock:
            return self.history.since(t_s)

    def window_from(self, t_s: float) -> tuple[dict | None, dict | None]:
        """:meth:`TotalsHistory.window_from`, read under the lock."""
        with self.lock:
            return self.history.window_from(t_s)

    def retire_exited(self) -> None:
        """Retire the sessions whose engine process has exited (their devices are freed)."""
        with self.lock:
            gone = [s for s in self.sessions.values() if not s.alive()]
            for s in gone:
                self._retire(s)
            if gone:
                self._save()
        self.flush()

    def finish(self) -> None:
        """Settle everything of every session (shutdown) and retire them."""
        with self.lock:
            for s in list(self.sessions.values()):
                self._retire(s)
        self.flush()

    def _publish(self, s: EngineSession, results: list[RequestResult]) -> None:
        """Complete each result (model label, engine, what it misses) and hand it to the in-memory sinks
        (caller holds the lock); the blocking sinks get it at :meth:`flush`."""
        out = []
        for res in results:
            missing = s.forget(res.id)
            status = "incomplete" if missing and res.status == "final" else res.status
            out.append(EngineResult.of(res, engine=s.key, model=s.label, status=status, missing=missing))
        self._sinks.deliver(out, blocking=False)
        self._outbox += out

    def flush(self) -> None:
        """Hand the results published so far to the blocking sinks (the ledger), outside the lock."""
        with self.lock:
            out, self._outbox = self._outbox, []
        if out:
            self._sinks.deliver(out, blocking=True)

    # -------------------------------------------------------------------------------- reading
    def totals(self) -> tuple[dict[str, Totals], dict]:
        """(cumulative totals per model label on the meter's device indices, the latest coefficients)."""
        with self.lock:
            model_totals = dict(self.base_totals)
            coefficients: dict = {}
            for s in self.sessions.values():
                if s.attributor is None:
                    continue
                try:
                    t = on_devices(s.attributor.totals(), s.devices, self.n_devices)
                except Exception:  # noqa: BLE001
                    self._stats.fail("scrape", "attribution totals failed")
                    continue
                model_totals[s.label] = add_totals(model_totals[s.label], t) if s.label in model_totals else t
                if s.geometry is not None:
                    coefficients = dict(t.coefficients or {})
            if not coefficients and model_totals:
                coefficients = dict(list(model_totals.values())[-1].coefficients or {})
            return model_totals, coefficients

    def describe(self) -> dict:
        """The sessions and progress, for ``/healthz``."""
        with self.lock:
            sessions = [{"pid": s.pid, "model": s.label, "state": s.state, "devices": list(s.devices),
                         "steps": s.steps, **({"error": s.error[:200]} if s.error else {})}
                        for s in self.sessions.values()]
            first = next(iter(self.sessions.values()), None)
            return {"model": first.label if first else None, "unsupported_model": self.unsupported_model,
                    "attributing": any(s.state == "attributing" for s in self.sessions.values()),
                    "engines": sessions, "hellos": self.hellos, "steps": self.steps, "lag_s": self.lag_s}

    def provisional(self, engine: str, rid: str) -> RequestResult | None:
        """A request still in its session's attributor (settled as far as it goes), or None."""
        with self.lock:
            s = self.sessions.get(engine)
            if s is None or s.attributor is None:
                return None
            try:
                res = s.attributor.provisional(rid)
            except Exception:  # noqa: BLE001
                self._stats.fail("lookup", "provisional lookup failed")
                return None
            if res is None:
                return None
            return EngineResult.of(res, engine=s.key, model=s.label, status=res.status,
                                   missing=s.missing.get(rid))
