"""When to poll a counter next: the poll schedule, written once (the sampler thread, the twin's poller
and the online replay all follow it).

A counter like NVML's total energy is republished about every 100 ms on the device's own clock, and
the counter rule (:mod:`wattprint.profiler.timeline.counter`) estimates each publish time as the
midpoint of the two polls around the change. Polled uniformly at 50 Hz, that estimate is uncertain by
±10 ms, and at the power of a busy GPU 10 ms is several joules: the error that limits short
attributions (a prefill). The republication is regular, so the schedule **locks onto its phase**: per
device it predicts the next publish time from the last one and the running period, and spends the same
number of reads per period (``rate_hz`` × period, at least three) in a cluster around the prediction,
as wide as the observed jitter demands. Once locked, a change is bracketed by a few milliseconds
instead of twenty, at the same read rate.

* A device not (or no longer) locked is polled uniformly at ``rate_hz``: before the first changes,
  after a missed prediction (a publish outside the cluster and half a period past it), for a counter
  that never changes.
* ``lock=False`` (counters updated at every read: RAPL, the CPU-time estimate) is plain uniform
  polling.
* Several devices: each has its own phase and cluster; the schedule polls at the earliest time any of
  them wants (so ``rate_hz`` is a rate per device).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

NOMINAL_PERIOD_S = 0.100  # NVML republishes about every 100 ms (facts.md)
MIN_PERIOD_S, MAX_PERIOD_S = 0.010, 1.0
LOCK_AFTER = 5  # consecutive predicted changes before the schedule trusts the phase
HIT_FRACTION = 0.25  # a change within this fraction of the period of its prediction is a hit
PERIOD_GAIN = 0.05  # how fast the running period follows the observed one
ERR_GAIN = 0.1  # how fast the observed prediction error (its mean square) is followed
CLUSTER_SIGMAS = 3.0  # a cluster spans the prediction ± this many observed errors
MIN_HALF_S = 0.0015  # a cluster is at least ±1.5 ms wide
MAX_HALF_FRACTION = 0.2  # and at most ±20 % of the period
MIN_GAP_S = 0.0005  # never two polls closer than this
MIN_READS = 3
#: reads in a cluster per read the rate allows in a period: the reads after the change is seen are not
#: made (the next cluster is planned instead) and a guard read precedes each cluster: 1.2 keeps the rate
CLUSTER_READS = 1.2


class PhaseLock:
    """One device's counter: the estimated time of its last publish, its running period and how far
    changes land from where they were predicted."""

    __slots__ = ("value", "t_poll_s", "t_pub_s", "period_s", "err2_s2", "hits")

    def __init__(self) -> None:
        self.value: float | None = None
        self.t_poll_s: float | None = None
        self.t_pub_s: float | None = None
        self.period_s = NOMINAL_PERIOD_S
        self.err2_s2 = (MAX_HALF_FRACTION * NOMINAL_PERIOD_S) ** 2
        self.hits = 0

    @property
    def locked(self) -> bool:
        return self.hits >= LOCK_AFTER

    def observe(self, t_s: float, value: float) -> None:
        """Take one poll of this device's counter."""
        if self.value is not None and value != self.value and self.t_poll_s is not None:
            self._changed(self.t_poll_s, t_s)
        self.value, self.t_poll_s = value, t_s

    def _changed(self, lo_s: float, hi_s: float) -> None:
        est = 0.5 * (lo_s + hi_s)
        if self.t_pub_s is not None:
            k = max(1, round((est - self.t_pub_s) / self.period_s))
            err = est - (self.t_pub_s + k * self.period_s)
            if abs(err) < HIT_FRACTION * self.period_s and hi_s - lo_s < 0.5 * self.period_s:
                self.period_s = min(max(self.period_s + PERIOD_GAIN * err / k, MIN_PERIOD_S), MAX_PERIOD_S)
                self.err2_s2 += ERR_GAIN * (err * err - self.err2_s2)
                self.hits = self.hits + 1 if k == 1 else 0
            else:
                self.hits = 0
        self.t_pub_s = est

    def wanted_after(self, t_s: float, reads: int) -> float | None:
        """The next time this device wants a poll after ``t_s``; None while it is not locked (poll
        uniformly)."""
        if not self.locked or self.t_pub_s is None:
            return None
        p = self.period_s
        half = min(max(CLUSTER_SIGMAS * math.sqrt(self.err2_s2), MIN_HALF_S), MAX_HALF_FRACTION * p)
        centre = self.t_pub_s + p
        spacing = 2.0 * half / (reads - 1)
        if t_s >= centre + half + 0.5 * p:  # the change never came where predicted: lost
            self.hits = 0
            return None
        first = centre - half
        if t_s < first - half - MIN_GAP_S:  # one guard read a cluster's width before it: a change
            return first - half  # published that early is still bracketed by ``half``, not a period
        if t_s < first:
            return first
        # inside the cluster, or past it with the change not seen yet: keep reading at its spacing
        return first + spacing * (math.floor((t_s - first) / spacing + 1e-9) + 1)


class PollSchedule:
    """The schedule for one meter: feed each poll, get the time of the next one."""

    def __init__(self, rate_hz: float, lock: bool = True):
        if not (rate_hz > 0 and math.isfinite(rate_hz)):
            raise ValueError(f"poll rate must be a positive number of Hz, got {rate_hz!r}")
        self.rate_hz = float(rate_hz)
        self.lock = bool(lock)
        self.devices: list[PhaseLock] = []

    def next_poll(self, t_s: float, values: Sequence[float]) -> float:
        """Take the poll at ``t_s`` (one value per device); return when to poll next."""
        uniform = t_s + 1.0 / self.rate_hz
        if not self.lock:
            return uniform
        if len(self.devices) != len(values):
            self.devices = [PhaseLock() for _ in values]
        nxt = math.inf
        for dev, v in zip(self.devices, values):
            dev.observe(t_s, v)
            want = dev.wanted_after(t_s, max(MIN_READS, round(CLUSTER_READS * self.rate_hz * dev.period_s)))
            nxt = min(nxt, uniform if want is None else want)
        return max(nxt, t_s + MIN_GAP_S)

    @property
    def locked(self) -> list[bool]:
        return [d.locked for d in self.devices]


def follow(schedule: PollSchedule, publish_times_s: Sequence[np.ndarray], values: Sequence[np.ndarray],
           t_begin_s: float, t_end_s: float, delays_s: Sequence[float] = (0.0,)) -> tuple[np.ndarray, np.ndarray]:
    """What a poller following ``schedule`` reads between ``t_begin_s`` and ``t_end_s`` from counters
    that publish ``values[d][k]`` at ``publish_times_s[d][k]`` (sorted; before the first publish a
    poll reads the first value): (poll times, values [polls, devices]). ``delays_s``: how late the
    poller wakes up each time, used in turn (the twin's poller; the online replay)."""
    pubs = [np.asarray(p, dtype=float).tolist() for p in publish_times_s]
    vals = [np.asarray(v, dtype=float).tolist() for v in values]
    delays = [float(d) for d in delays_s] or [0.0]
    times, seen = [], []
    t, i = t_begin_s, 0
    while t <= t_end_s:
        row = [v[max(bisect.bisect_right(p, t) - 1, 0)] for p, v in zip(pubs, vals)]
        times.append(t)
        seen.append(row)
        t = schedule.next_poll(t, row) + delays[i % len(delays)]
        i += 1
    return np.asarray(times), np.asarray(seen, dtype=float).reshape(len(times), len(pubs))
