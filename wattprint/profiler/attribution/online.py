"""Online attribution: the same fit/settle/split rules as offline, fed as data arrives, bounded memory."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.coefficients import Coefficients, prior_coefficients
from wattprint.profiler.attribution.columns import StepColumns, columns_from_steps
from wattprint.profiler.attribution.devices import OnlineDevice
from wattprint.profiler.attribution.features import FAR_PAST_S
from wattprint.profiler.attribution.provisional import predicted_parts
from wattprint.profiler.attribution.settle import extrapolate_after, settle_device
from wattprint.profiler.attribution.split import split_steps
from wattprint.profiler.attribution.table import RequestTable, add_breakdowns, note_metadata
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.efficiency import IdealCost
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.timeline.counter import publish_mode


class OnlineAttributor:
    """Streaming attribution with bounded memory: the fit/settle/split core of :func:`attribute`.

    Feed steps (in order) with :meth:`add_step` and meter readings with :meth:`add_reading`; call
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
        # the fit runs ahead of settlement: a block is settled with coefficients that have seen the
        # counter this long past its end (default: five windows, 10 s), so early blocks are not split
        # by an unformed fit; final records come that much later (provisional ones at once)
        lookahead = 5.0 * window_s if fit_lookahead_s is None else fit_lookahead_s
        self.lookahead_s = lookahead if coefficients is None else 0.0
        # and nothing is settled before the fit has seen this much of the counter (default: ten windows,
        # 20 s): a sidecar's first blocks are not split by a fit formed on seconds of data
        warmup = 10.0 * window_s if fit_warmup_s is None else fit_warmup_s
        self.warmup_s = warmup if coefficients is None else 0.0
        self._fitted_until: float | None = None
        self._fit_from: float | None = None
        self._steps: list[StepRecord] = []
        self._by_request: dict[str, deque[StepRecord]] = {}
        self._last_step: StepRecord | None = None
        self._received_until = -math.inf
        self._max_step_s = 0.0
        self._settled_until: float | None = None
        self._prev_end = -FAR_PAST_S  # end of the last step wholly settled
        self.table = RequestTable(IdealCost.of(geometry, profile, n_devices))
        self._emitted: set[int] = set()
        # coefficients: one per device, used as they are (no running fit), to compare with offline
        coefs = coefficients or [prior_coefficients(profile, n_devices)] * n_devices
        self._dev = [OnlineDevice(c, publish_mode(source), fit=coefficients is None) for c in coefs]
        self._pending_results: list[RequestResult] = []
        self._totals = Totals(0.0, 0.0, 0.0, source, device_measured_j=[0.0] * n_devices)
        self.late_steps = 0
        self._flushing = False

    # ---- input
    def add_step(self, step: StepRecord) -> None:
        """Add one step (in order). Raises :class:`InputError` for out-of-order or malformed steps."""
        last = self._last_step
        if last is not None and (step.step <= last.step or step.t_start < last.t_end - 1e-6):
            raise InputError(f"step {step.step} arrived out of order (after step {last.step})")
        if not step.t_end >= step.t_start:
            raise InputError(f"step {step.step} ends before it starts")
        if self._settled_until is not None and step.t_end <= self._settled_until:
            self.late_steps += 1  # its time was already settled (as idle)
            return
        self._steps.append(step)
        for r in step.requests:  # each request's unsettled steps, for provisional lookups
            self._by_request.setdefault(r.id, deque()).append(step)
        self._last_step = step
        self._received_until = step.t_end
        self._max_step_s = max(self._max_step_s, step.t_end - step.t_start)
        t = self.table
        slots = np.empty(len(step.requests), dtype=np.int64)
        for i, r in enumerate(step.requests):
            k = t.slots.get(r.id)
            if k is None or k in self._emitted:  # new, or back after it was settled as stale: a new record
                k = t.slots[r.id] = len(t.ids)
                t.ids.append(r.id)
            slots[i] = k
            if r.finished:
                t.finished.add(k)
        note_metadata(t, step.requests, slots)

    def add_reading(self, reading: Reading) -> None:
        """Add one meter poll (cumulative joules per device)."""
        for d, e in enumerate(reading.energy_j[: self.n_dev]):
            self._dev[d].observe(reading.t_s, float(e))

    # ---- output
    def advance(self, now_s: float) -> list[RequestResult]:
        """Fit every complete block, settle those the fit has looked past; return the finished requests
        that became final."""
        while self._fit_next(now_s):
            pass
        while self._settle_next(now_s):
            pass
        out, self._pending_results = self._pending_results, []
        return out

    def totals(self) -> Totals:
        """Cumulative totals at the last settled instant (``attributed_j + idle_j == measured_j``)."""
        import msgspec

        return msgspec.convert(msgspec.to_builtins(self._totals), Totals)

    def lag_s(self, now_s: float) -> float:
        """How far settlement trails ``now_s`` (seconds)."""
        return now_s - self._settled_until if self._settled_until is not None else 0.0

    @property
    def coefficients(self) -> dict:
        """Device 0's coefficients, and which of them the data determined (``fitted``) and which are
        still the hardware profile's (``from_profile``)."""
        return {**self._dev[0].coef.as_dict(), **self._dev[0].report}

    @property
    def active_requests(self) -> int:
        return len(self.table.ids) - len(self._emitted)

    def provisional(self, request_id: str) -> RequestResult | None:
        """A request not yet final (status ``provisional``): its settled part plus the fitted model's
        prediction for its steps past the settled time."""
        k = self.table.slots.get(request_id)
        if k is None or k in self._emitted:
            return None
        since = self._settled_until if self._settled_until is not None else -math.inf
        pending = [s for s in self._by_request.get(request_id, ()) if s.t_end > since]
        add = None
        if pending:
            add = predicted_parts(pending, k, self.g, self.table, [d.coef for d in self._dev], since)
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
        if self._steps and self._settled_until is not None:
            self._extrapolate_tail(self._settled_until)
            out += self._pending_results
            self._pending_results = []
        unsettled = {self.table.slots[r.id] for s in self._steps for r in s.requests}
        for k in range(len(self.table.ids)):
            if k not in self._emitted:
                final = k in self.table.finished and k not in unsettled
                out.append(self.table.result(k, self.source, self.model, status="final" if final else "provisional"))
                self._emitted.add(k)
        return out

    def _extrapolate_tail(self, t_from: float) -> None:
        cols = columns_from_steps(self._steps, self.g, self.table.slots, self.table.ids)
        self.table.ensure(len(self.table.ids))
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
        if end is None and self._flushing and d0.b_t and d0.b_t[-1] > start:
            end = d0.b_t[-1]  # shutting down: a last, shorter block
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
        steps = [s for s in self._steps if s.t_start < end and s.t_end > start]
        prev_end = max([self._prev_end] + [s.t_end for s in self._steps if s.t_end <= start])
        if steps:
            cols = columns_from_steps(steps, self.g, self.table.slots, self.table.ids)
            self.table.ensure(len(self.table.ids))
            for dev in self._dev:
                b_t, b_e = dev.boundaries_between(start, end)
                dev.update_fit(cols, b_t, b_e, start, prev_end, self.half_life_s)
        self._fitted_until = end
        if self._fit_from is None:
            self._fit_from = start
        return True

    def _settle_next(self, now_s: float) -> bool:
        edges = self._block_edges(now_s, self._settled_until)
        if edges is None:
            return False
        start, end = edges
        if self._dev[0].fit and not self._flushing and (
                self._fitted_until is None or self._fitted_until < end + self.lookahead_s
                or self._fitted_until - self._fit_from < self.warmup_s):
            return False  # wait until the fit has seen the counter past this block
        steps = [s for s in self._steps if s.t_start < end]
        cols = columns_from_steps(steps, self.g, self.table.slots, self.table.ids) if steps else None
        self.table.ensure(len(self.table.ids))
        step_energy = np.zeros(len(steps))
        step_static = np.zeros(len(steps))
        e_flop = np.zeros(len(steps))
        e_byte = 0.0
        tot = self._totals
        for d, dev in enumerate(self._dev):
            e0, e1 = dev.energy_at(start), dev.energy_at(end)
            measured = e1 - e0
            if cols is not None:
                energy, idle, static = settle_device(cols, dev.coef, np.array([start, end]),
                                                     np.array([e0, e1]), start, self._prev_end)
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
        if tot.t_start is None:
            tot.t_start = start
        tot.t_end = end
        self._settled_until = end
        if cols is not None:
            self._account(cols, step_energy, step_static, e_flop, e_byte, end)
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
        for s in self._steps:
            if s.t_end > end:
                break
            for r in s.requests:  # settled: no longer pending (each deque is in time order)
                q = self._by_request.get(r.id)
                if q and q[0] is s:
                    q.popleft()
                    if not q:
                        del self._by_request[r.id]
        self._steps = [s for s in self._steps if s.t_end > end]
        live = {self.table.slots[r.id] for s in self._steps for r in s.requests}
        done_ids = self.table.finished - live - self._emitted
        t_last = self.table.col("t_end")
        stale = {k for k in range(len(self.table.ids)) if k not in live and k not in self._emitted
                 and t_last[k] < end - self.stale_after_s}
        for k in sorted(done_ids | stale):
            status = "final" if k in done_ids else "incomplete"  # stale: no finished flag ever came
            self._pending_results.append(self.table.result(k, self.source, self.model, status=status))
            self._emitted.add(k)
            tot.requests += 1
        if len(self._emitted) > 256 and len(self._emitted) * 2 > len(self.table.ids):
            self._compact()

    def _compact(self) -> None:
        """Forget emitted requests (bounded memory)."""
        self.table = self.table.without(self._emitted)
        self._emitted = set()
