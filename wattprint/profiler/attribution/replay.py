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
from wattprint.profiler.timeline.counter import publish_mode, publish_times
from wattprint.profiler.timeline.schedule import PollSchedule, follow

HOOK_BATCH = 8  # records per message, as the vLLM hook sends them
HOOK_FLUSH_S = 0.05  # the hook sends what gathered at most this long after a step ends
ADVANCE_EVERY_S = 0.25  # the sidecar's settlement period
DENSER = 1.1  # a recording polled at most this much faster than the replayed poller is replayed as it is


@dataclass
class OnlineReplay:
    requests: list[RequestResult]
    totals: Totals
    readings: int
    messages: int
    #: each record's trace time when the driver emitted it (those from the shutdown: the last event's)
    emitted_at_s: dict[str, float]


def resample(readings: Sequence[Reading], rate_hz: float) -> list[Reading]:
    """What the sidecar's sampler polling at ``rate_hz`` would have read: it follows the poll schedule
    (:mod:`wattprint.profiler.timeline.schedule`: locked onto the counter's republication, uniform for
    counters updated at every read), and each reading is stamped with its poll's time. A recorded value
    was published somewhere since the previous recorded poll; the replayed poller sees it from the
    counter rule's estimate of that time on (the midpoint of the recorded gap; the sample time itself
    for counters updated at every read), not only from the recorded poll on, which would delay every
    change by up to one recorded period. A recording no denser than ``rate_hz`` (within ``DENSER``) is
    what such a poller read: it is replayed as it is (polling it again would only add a second
    poller's bracket to the first)."""
    if not (rate_hz > 0 and math.isfinite(rate_hz)):
        raise InputError(f"--meter-hz must be a positive number, got {rate_hz}")
    t = np.array([r.t_s for r in readings])
    if len(t) < 2 or (len(t) - 1) / (t[-1] - t[0]) <= DENSER * rate_hz:
        return list(readings)  # recorded no more densely than that poller reads: it read these polls
    e = np.array([r.energy_j for r in readings], dtype=float).reshape(len(readings), -1)
    mode = publish_mode(readings[0].source)
    pub = np.concatenate([t[:1], publish_times(t[:-1], t[1:], mode)])  # the counter rule's estimate
    keep = np.concatenate([[True], np.any(e[1:] != e[:-1], axis=1)])  # the first value and each change
    n_dev = e.shape[1]
    ticks, seen = follow(PollSchedule(rate_hz, lock=mode == "midpoint"), [pub[keep]] * n_dev,
                         [e[keep, d] for d in range(n_dev)], float(t[0]), float(t[-1]))
    return [Reading(float(tk), tuple(map(float, row)), readings[0].source) for tk, row in zip(ticks, seen)]


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


def arrivals(polls: Sequence[Reading], messages: list[tuple[float, list[StepRecord]]]):
    """Meter polls and the hook's messages in the order the sidecar receives them: ``(t, 0, reading)``
    and ``(t, 1, steps)``, a reading before a message at the same instant."""
    return heapq.merge(((r.t_s, 0, r) for r in polls), ((t, 1, b) for t, b in messages),
                       key=lambda e: (e[0], e[1]))


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
    out: list[RequestResult] = []
    emitted: dict[str, float] = {}
    next_advance, t = -math.inf, -math.inf
    for t, kind, item in arrivals(polls, messages):
        if kind == 0:
            on.add_reading(item)
        else:
            added = on.add_steps(item)
            if added.invalid:
                raise InputError(added.invalid[0][1])
        if t >= next_advance:
            new = on.advance(t)
            emitted.update((r.id, t) for r in new)
            out += new
            next_advance = t + ADVANCE_EVERY_S
    new = on.finish()
    emitted.update((r.id, t) for r in new)
    out += new
    return OnlineReplay(out, on.totals(), len(polls), len(messages), emitted)
