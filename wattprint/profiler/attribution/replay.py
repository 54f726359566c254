"""Replay a recorded trace through the online driver exactly as the sidecar receives it: meter readings
at a given rate, step records in the hook's batches, settlement every quarter second of trace time.

This makes the online path measurable from outside (``wattprint attribute --online``): the same files,
the same fit and settle as the sidecar, without a sidecar.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.attribution.online import OnlineAttributor
from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.hardware import HardwareProfile
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.core.results import RequestResult, Totals
from wattprint.profiler.meters.base import Reading

HOOK_BATCH = 8  # records per message, as the vLLM hook sends them
HOOK_FLUSH_S = 0.05  # the hook sends what gathered at most this long after a step ends
ADVANCE_EVERY_S = 0.25  # the sidecar's settlement period


@dataclass
class OnlineReplay:
    requests: list[RequestResult]
    totals: Totals
    readings: int
    messages: int


def resample(readings: Sequence[Reading], rate_hz: float) -> list[Reading]:
    """What a meter polled at ``rate_hz`` would have read, stamped with the tick's time. A recorded
    reading's value was published somewhere since the previous recorded poll; a poller at ``rate_hz``
    sees it from about the midpoint of that gap on (the counter rule's own estimate of the publish
    time), not only from the recorded poll on, which would delay every change by up to one period."""
    if not (rate_hz > 0 and math.isfinite(rate_hz)):
        raise InputError(f"--meter-hz must be a positive number, got {rate_hz}")
    t = np.array([r.t_s for r in readings])
    ticks = np.arange(t[0], t[-1] + 1e-12, 1.0 / rate_hz)
    mid = np.concatenate([t[:1], 0.5 * (t[1:] + t[:-1])])
    idx = np.searchsorted(mid, ticks, side="right") - 1
    return [Reading(float(tk), readings[i].energy_j, readings[i].source) for tk, i in zip(ticks, idx)]


def hook_batches(steps: Sequence[StepRecord]) -> list[tuple[float, list[StepRecord]]]:
    """Step records grouped as the hook sends them: up to ``HOOK_BATCH`` a message, sent when full or
    ``HOOK_FLUSH_S`` after the batch's first step ended if no other step ended by then."""
    out: list[tuple[float, list[StepRecord]]] = []
    batch: list[StepRecord] = []
    for s in steps:
        if batch and s.t_end > batch[0].t_end + HOOK_FLUSH_S:
            out.append((batch[0].t_end + HOOK_FLUSH_S, batch))
            batch = []
        batch.append(s)
        if len(batch) == HOOK_BATCH:
            out.append((s.t_end, batch))
            batch = []
    if batch:
        out.append((batch[0].t_end + HOOK_FLUSH_S, batch))
    return out


def replay_online(steps: Sequence[StepRecord], readings: Sequence[Reading], g: ModelGeometry,
                  hw: HardwareProfile, *, source: str, meter_hz: float | None = None, window_s: float = 2.0,
                  model_name: str | None = None, **online_kw) -> OnlineReplay:
    """Run the trace through :class:`OnlineAttributor` in arrival order; return every request record
    (finals as they settle, then what :meth:`~OnlineAttributor.finish` reports) and the totals."""
    if not steps:
        raise InputError("no steps to attribute")
    if not readings:
        raise InputError("no energy readings")
    polls = resample(readings, meter_hz) if meter_hz else list(readings)
    n_dev = len(polls[0].energy_j)
    on = OnlineAttributor(g, hw, n_devices=n_dev, source=source, model_name=model_name, window_s=window_s,
                          **online_kw)
    messages = hook_batches(steps)
    # events in arrival order: readings (0) before messages (1) at the same instant
    events = heapq.merge(((r.t_s, 0, r) for r in polls), ((t, 1, b) for t, b in messages),
                         key=lambda e: (e[0], e[1]))
    out: list[RequestResult] = []
    next_advance = -math.inf
    for t, kind, item in events:
        if kind == 0:
            on.add_reading(item)
        else:
            added = on.add_steps(item)
            if added.invalid:
                raise InputError(added.invalid[0][1])
        if t >= next_advance:
            out += on.advance(t)
            next_advance = t + ADVANCE_EVERY_S
    out += on.finish()
    return OnlineReplay(out, on.totals(), len(polls), len(messages))
