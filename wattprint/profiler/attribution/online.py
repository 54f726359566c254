"""Online attribution: the same fit/settle/split rules as offline, fed as data arrives, bounded memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.coefficients import Coefficients, prior_coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.devices import OnlineDevice
from wattprint.profiler.attribution.features import FAR_PAST_S
from wattprint.profiler.attribution.pacing import (  # noqa: F401 (the lead's bounds, re-exported)
    MAX_LEAD_ENTRIES,
    MIN_LEAD_WINDOWS,
    SettleHold,
    fit_lead_s,
    fit_origins,
    fit_timing,
    refit_blocks,
    shutdown_end,
)
from wattprint.profiler.attribution.pending import (
    Added,
    Intake,
    PendingSteps,
    batch_columns,
    classify,
)
from wattprint.profiler.attribution.provisional import predicted_parts
from wattprint.profiler.attribution.settle import extrapolate_after, settle_device
from wattprint.profiler.attribution.split import split_steps
from wattprint.profiler.attribution.table import RequestTable, add_breakdowns
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.efficiency import IdealCost
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.timeline.counter import publish_mode

__all__ = ["Added", "OnlineAttributor"]




class OnlineAttributor:
    """Streaming attribution with bounded memory: the fit/settle/split core of :func:`attribute`.

    Feed steps (in order) with :meth:`add_steps` (a batch, as a message brings them) or :meth:`add_step`,
    and meter readings with :meth:`add_reading`; call
    :meth:`advance` periodically. Blocks end at device 0's counter changes, at least ``window_s``
    apart (other devices' counters are interpolated there). A block is settled once every device's
    counter has changed past its end and every step that began before its end has arrived (or
    ``grace_s`` passed with none). Settling gives the block's measured joules to steps and idle and
    splits the steps' joules between requests; a finished request is final when its last step is
    settled, and is then emitted and forgotten.
    """

    def __init__(self, geometry: ModelGeometry, profile: HardwareProfile, *, n_devices: int, source: str,
                 model_name: str | None = None, window_s: float = 2.0, fit_half_life_s: float = 600.0,
                 grace_s: float = 1.0, stale_after_s: float = 300.0, fit_lookahead_s: float | None = None,
                 fit_warmup_s: float | None = None,
                 coefficients: Sequence[Coefficients] | None = None):
        self.g, self.hw, self.n_dev, self.source = geometry, profile, n_devices, source
        self.model = model_name or geometry.name
        self.window_s, self.grace_s = window_s, grace_s
        self.stale_after_s = stale_after_s  # a request unseen this long (aborted between steps) is settled
        self.half_life_s = fit_half_life_s
        self.lookahead_s, self.warmup_s = fit_timing(window_s, fit_lookahead_s, fit_warmup_s, coefficients is None)
        self._fitted_until: float | None = None
        self._fit_from: float | None = None
        self._pending = PendingSteps()  # steps not yet wholly settled, as columns
        self._last: tuple[int, float] | None = None  # the last step accepted: (number, t_end)
        self._first_t: float | None = None  # the earliest time held (first step's start or reading)
        self._received_until = -math.inf
        self._max_step_s = 0.0
        self._settled_until: float | None = None
        self._prev_end = -FAR_PAST_S  # end of the last step wholly settled
        self.table = RequestTable(IdealCost.of(geometry, profile, n_devices))
        self._intake = Intake(self.table)
        self._emitted: set[int] = set()
        # coefficients: one per device, used as they are (no running fit), to compare with offline
        coefs = coefficients or [prior_coefficients(profile, n_devices)] * n_devices
        self._dev = [OnlineDevice(c, publish_mode(source), fit=coefficients is None) for c in coefs]
        self._pending_results: list[RequestResult] = []
        self._totals = Totals(0.0, 0.0, 0.0, source, device_measured_j=[0.0] * n_devices)
        self.late_steps = 0
        self._flushing = False
        self._hold = SettleHold()

    # ---- input
    def add_step(self, step: StepRecord) -> None:
        """Add one step (in order). Raises :class:`InputError` for out-of-order or malformed steps."""
        added = self.add_steps([step])
        if added.invalid:
            raise InputError(added.invalid[0][1])

    def add_steps(self, steps: Sequence[StepRecord], stratum_of: Callable[[str], str] | None = None,
                  entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Added:
        """Add a batch of steps (in order, after those already added); the per-entry work is vectorised.
        A step out of order or ending before it starts is rejected (and changes nothing); a step whose
        time was already settled (as idle) is counted in ``late_steps`` and not attributed.
        ``stratum_of`` normalises a stratum when a request's record takes it (default: as given);
        ``entries``: the prefill, decode and context tokens of every entry of ``steps``, when the caller
        extracted them already (the sidecar passes an ``entries.EntryColumns``: ids, finished, outputs too)."""
        added, last = classify(steps, self._last, self._settled_until)
        self.late_steps += len(added.late)
        if not added.accepted:
            return added
        t0, t1, counts, reqs, tokens = batch_columns(steps, added.accepted, entries)
        seq = self._pending.next_seq + np.repeat(np.arange(len(t0)), counts)
        self._pending.append(t0, t1, counts, self._intake.slots(reqs, np.repeat(t1, counts), stratum_of, seq), *tokens)
        self._last = last
        self._first_t = float(t0[0]) if self._first_t is None else self._first_t
        self._received_until = float(t1[-1])
        self._max_step_s = max(self._max_step_s, float((t1 - t0).max()))
        return added

    def add_reading(self, reading: Reading) -> None:
        """Add one meter poll (cumulative joules per device)."""
        for d, e in enumerate(reading.energy_j[: self.n_dev]):
            self._dev[d].observe(reading.t_s, float(e))
        if self._first_t is None:
            self._first_t = reading.t_s

    # ---- output
    def advance(self, now_s: float, on_settled=None) -> list[RequestResult]:
        """Fit every complete block, settle those the fit has looked past (``on_settled()`` after each);
        return the finished requests that became final."""
        while self._fit_next(now_s):
            pass
        while self._settle_next(now_s):
            if on_settled is not None:
                on_settled()
        out, self._pending_results = self._pending_results, []
        return out

    def totals(self) -> Totals:
        """Cumulative totals at the last settled instant (``attributed_j + idle_j == measured_j``)."""
        return msgspec.convert(msgspec.to_builtins(self._totals), Totals)

    def lag_s(self, now_s: float) -> float:
        """How far settlement trails ``now_s`` (seconds): from the last settled instant; before anything
        is settled (the fit's warm-up), from the earliest time held (the first step's start or the first
        reading); 0.0 while nothing was received."""
        if self._settled_until is not None:
            return now_s - self._settled_until
        return now_s - self._first_t if self._first_t is not None else 0.0

    @property
    def settled_until_s(self) -> float | None:
        """The last settled instant (None before the first settlement)."""
        return self._settled_until

    @property
    def pending_steps(self) -> int:
        """Steps held, not yet wholly settled."""
        return len(self._pending)

    @property
    def coefficients(self) -> dict:
        """Device 0's coefficients, and which of them the data determined (``fitted``) and which are
        still the hardware profile's (``from_profile``)."""
        return {**self._dev[0].coef.as_dict(), **self._dev[0].report}

    @property
    def active_requests(self) -> int:
        return len(self.table.slots)

    def provisional(self, request_id: str) -> RequestResult | None:
        """A request not yet final (status ``provisional``): its settled part plus the fitted model's
        prediction for its steps past the settled time."""
        k = self.table.slots.get(request_id)
        if k is None or k in self._emitted:
            return None
        since = self._settled_until if self._settled_until is not None else -math.inf
        lo, hi = self._intake.seq[:, k].tolist()
        steps = self._pending.steps_of(k, since, lo, hi)
        add = None
        if len(steps):
            cols = self._pending.columns(steps, self.g, self.table.ids)
            add = predicted_parts(cols, k, self.g, [d.coef for d in self._dev], since)
        return self.table.result(k, self.source, self.model, status="provisional", add=add)

    def finish(self) -> list[RequestResult]:
        """Shut down: settle what the counters cover (a last block may be short), give steps past the
        counter's last change the fitted model's prediction (``extrapolated_j``, as offline), then
        report every request still held (``provisional`` unless it finished)."""
        out = self.advance(math.inf)
        self._flushing = True
        try:
            out += self.advance(math.inf)
        finally:
            self._flushing = False
        if len(self._pending) and self._settled_until is not None:
            self._extrapolate_tail(self._settled_until)
            out += self._pending_results
            self._pending_results = []
        unsettled = set(np.unique(self._pending.col("slot")).tolist())
        for k in range(len(self.table.ids)):
            if k not in self._emitted:
                final = k in self.table.finished and k not in unsettled
                out.append(self.table.result(k, self.source, self.model, status="final" if final else "provisional"))
                self._emitted.add(k)
        return out

    def _extrapolate_tail(self, t_from: float) -> None:
        cols = self._pending.columns(np.arange(len(self._pending)), self.g, self.table.ids)
        parts = [extrapolate_after(cols, dev.coef, t_from) for dev in self._dev]
        tail, static = sum(p[0] for p in parts), sum(p[1] for p in parts)
        e_flop = sum(dev.coef.flop_energy_j(cols) for dev in self._dev)
        e_byte = sum(dev.coef.energy_per_byte_j for dev in self._dev)
        self._totals.extrapolated_j += float(tail.sum())
        self._account(cols, tail, static, e_flop, e_byte, math.inf)

    # ---- internals
    def _block_edges(self, now_s: float, since: float | None) -> tuple[float, float] | None:
        d0 = self._dev[0]
        if since is None:  # the first block starts where every counter is known
            if any(len(d.b_t) < 2 for d in self._dev):
                return None
            first = max(d.b_t[0] for d in self._dev)
            starts = [b for b in d0.b_t if b >= first]
            if not starts:
                return None
            start = starts[0]
        else:
            start = since
        end = next((b for b in d0.b_t if b >= start + self.window_s), None)
        if self._flushing:
            end = shutdown_end(self._dev, start, end)
        if end is None or any(not d.b_t or d.b_t[-1] < end for d in self._dev[1:]):
            return None
        grace = max(self.grace_s, 2.0 * self._max_step_s)
        if self._received_until < end and now_s - end < grace:
            return None  # a step may still be running across the block's end
        return start, end

    def _fit_next(self, now_s: float) -> bool:
        """Add the next complete block's counter intervals to every device's running fit."""
        if not self._dev[0].fit:
            return False
        edges = self._block_edges(now_s, self._fitted_until)
        if edges is None:
            return False
        start, end = edges
        self._fit_block(start, end, self._dev, self._fitted_until is None)
        self._fitted_until, self._fit_from = end, start if self._fit_from is None else self._fit_from
        redo, first = [d for d in self._dev if d.needs_refit], self._settled_until is None
        for d in redo:  # the latency moved: the blocks not yet settled are fitted again with it
            d.restart_fit(first)
        for t, e in refit_blocks(self._dev[0].b_t, self._fit_from if first else self._settled_until, end,
                                 self.window_s) if redo else ():
            self._fit_block(t, e, redo, first and t == self._fit_from, refit=True)
        return True

    def _fit_block(self, start: float, end: float, devs: list, first: bool, refit: bool = False) -> None:
        origins = fit_origins(devs, start, self._settled_until, first)
        lo, p = min(origins), self._pending
        t0, t1 = p.col("t_start"), p.col("t_end")
        steps = np.flatnonzero((t0 < end) & (t1 > lo))
        before = t1[t1 <= lo]
        # (the fast tail of the step before ``lo`` is left out of these rows: one gap per block, a few mJ)
        prev_end = max(self._prev_end, float(before.max())) if len(before) else self._prev_end
        if len(steps):
            cols = p.columns(steps, self.g, self.table.ids)
            for dev, origin in zip(devs, origins):
                b_t, b_e = dev.boundaries_between(origin, end)
                dev.update_fit(cols, b_t, b_e, origin, prev_end, self.half_life_s, new_after=start,
                               settled_until=self._settled_until, refit=refit)

    def _settle_next(self, now_s: float) -> bool:
        edges = self._block_edges(now_s, self._settled_until)
        if edges is None:
            return False
        start, end = edges
        fitting = self._dev[0].fit and not self._flushing
        if fitting and (
                self._fitted_until is None
                or self._fitted_until < end + fit_lead_s(self.lookahead_s, self.window_s, self._pending.n_entries)
                or self._fitted_until - self._fit_from < self.warmup_s):
            return False  # wait until the fit has seen the counter past this block
        hold = fitting and self._hold.may(end, self._fitted_until, self._pending.n_entries, self.lookahead_s,
                                          self.window_s)
        if hold and self._hold.still(end, self._fitted_until, self.window_s):
            return False  # waiting for the fit to know its compute-bound steps
        steps = np.flatnonzero(self._pending.col("t_start") < end)
        cols = self._pending.columns(steps, self.g, self.table.ids) if len(steps) else None
        if hold and cols is not None and self._hold.decide(end, self._fitted_until, self._dev, cols):
            return False  # wait until the fit knows what its compute-bound steps cost
        tot = self._totals
        parts = settle_devices(self._dev, cols, len(steps), start, end, self._prev_end, tot)
        if tot.t_start is None:
            tot.t_start = start
        tot.t_end = end
        self._settled_until = end
        if cols is not None:
            self._account(cols, *parts, end)
        tot.coefficients = self.coefficients
        return True

    def _account(self, cols: StepColumns, step_energy: np.ndarray, step_static: np.ndarray, e_flop: np.ndarray,
                 e_byte: float, end: float) -> None:
        split = split_steps(cols, self.g, step_energy, step_static, e_flop, e_byte)
        done = cols.t_end <= end  # steps wholly settled: their tokens, bytes and FLOPs count now
        count = done[cols.step_of]
        self.table.add(cols, split, count_tokens=count)
        tot = self._totals
        add_breakdowns(tot, cols, split, self.table, count)
        tot.steps += int(done.sum())
        if done.any():
            self._prev_end = max(self._prev_end, float(cols.t_end[done].max()))
        self._pending.drop_settled(end)
        n = len(self.table.ids)
        open_ = np.ones(n, dtype=bool)  # not emitted, and no step of it still held
        open_[list(self._emitted)] = False
        open_ &= self._intake.last_t[:n] <= end
        done_ids = {k for k in self.table.finished if open_[k]}
        stale = set(np.flatnonzero(open_ & (self.table.col("t_end")[:n] < end - self.stale_after_s)).tolist())
        for k in sorted(done_ids | stale):
            status = "final" if k in done_ids else "incomplete"  # stale: no finished flag ever came
            self._pending_results.append(self.table.result(k, self.source, self.model, status=status))
            self._emitted.add(k)
            tot.requests += 1
        self._intake.forget(done_ids | stale)
        if len(self._emitted) > 256 and len(self._emitted) * 2 > len(self.table.ids):
            self._compact()

    def _compact(self) -> None:
        """Forget emitted requests (bounded memory)."""
        keep = np.array([k for k in range(len(self.table.ids)) if k not in self._emitted], dtype=np.int64)
        self.table = self.table.without(self._emitted)
        self._pending.remap(self._intake.compacted(self.table, keep))
        self._emitted = set()


def settle_devices(devices: Sequence[OnlineDevice], cols: StepColumns | None, n_steps: int, start: float,
                   end: float, prev_end: float, tot: Totals) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Settle the block [start, end] on every device (its steps ``cols``, None if it holds none): add the
    measured and idle joules to ``tot``; return the steps' energy, static energy and energy per FLOP
    (summed over devices) and the devices' summed energy per byte."""
    step_energy, step_static, e_flop, e_byte = np.zeros(n_steps), np.zeros(n_steps), np.zeros(n_steps), 0.0
    for d, dev in enumerate(devices):
        e0, e1 = dev.energy_at(start), dev.energy_at(end)
        measured = e1 - e0
        if cols is not None:
            energy, idle, static, dev.prev_tail_w = settle_device(
                cols, dev.coef, np.array([start, end]), np.array([e0, e1]), start, prev_end, dev.prev_tail_w)
            step_energy += energy
            step_static += static
            e_flop += dev.coef.flop_energy_j(cols)
            e_byte += dev.coef.energy_per_byte_j
            tot.idle_j += float(idle.sum())
        else:
            tot.idle_j += measured
        tot.device_measured_j[d] += measured
        tot.measured_j += measured
        dev.forget_before(end)
    return step_energy, step_static, e_flop, e_byte
