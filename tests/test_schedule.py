"""The poll schedule: locked onto a counter's republication, a change is bracketed by milliseconds at
the same read rate; uniform when there is nothing to lock onto; never stalls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wattprint.profiler.meters.base import Meter, Reading
from wattprint.profiler.timeline.sampler import EnergyTimeline
from wattprint.profiler.timeline.schedule import MAX_PERIOD_S, MIN_GAP_S, PollSchedule, follow
from wattprint.profiler.twin.power import SensorEffects


def _nvml_like(seed: int, duration_s: float = 60.0, jitter_s: float = 0.004):
    rng = np.random.default_rng(seed)
    pub = SensorEffects(publish_jitter_s=jitter_s).publish_times(0.0, duration_s, rng)
    return pub, np.arange(len(pub), dtype=float)  # a value that changes at every publish


def _brackets(t, seen, pub):
    """For every change seen: the two polls around it and the true publish time."""
    idx = np.flatnonzero(np.diff(seen) != 0) + 1
    true = pub[np.searchsorted(pub, t[idx], side="right") - 1]
    return t[idx - 1], t[idx], true


def test_locked_brackets_changes_by_milliseconds_at_the_same_read_rate():
    pub, val = _nvml_like(1)
    locked_t, locked_v = follow(PollSchedule(50.0), [pub], [val], 0.0, 60.0)
    uniform_t, uniform_v = follow(PollSchedule(50.0, lock=False), [pub], [val], 0.0, 60.0)
    lo, hi, true = _brackets(locked_t, locked_v[:, 0], pub)
    ulo, uhi, utrue = _brackets(uniform_t, uniform_v[:, 0], pub)
    assert len(lo) >= 0.98 * len(ulo)  # every republication is still seen
    assert len(locked_t) / 60.0 <= 1.02 * 50.0  # no more reads than uniform polling
    err = np.abs(0.5 * (lo + hi) - true)[10:]
    uerr = np.abs(0.5 * (ulo + uhi) - utrue)[10:]
    assert np.median(err) < 0.0025 < np.median(uerr)
    assert np.sqrt(np.mean(err**2)) < 0.5 * np.sqrt(np.mean(uerr**2))


def test_uniform_when_not_locking():
    pub, val = _nvml_like(2, 5.0)
    t, _ = follow(PollSchedule(50.0, lock=False), [pub], [val], 0.0, 5.0)
    assert np.allclose(np.diff(t), 0.02)


def test_irregular_counter_is_polled_uniformly():
    """Publishes with no period to lock onto: the schedule keeps polling at the rate."""
    rng = np.random.default_rng(3)
    pub = np.cumsum(rng.exponential(0.1, 600))
    sched = PollSchedule(50.0)
    t, _ = follow(sched, [pub], [np.arange(len(pub), dtype=float)], 0.0, float(pub[-1]))
    assert np.mean(np.diff(t) <= 0.02 + 1e-9) > 0.95
    assert len(t) / (t[-1] - t[0]) > 0.9 * 50.0


def test_relocks_after_a_phase_jump():
    pub, val = _nvml_like(4, 20.0, jitter_s=0.001)
    pub = np.where(pub > 10.0, pub + 0.037, pub)  # the device's clock jumps by 37 ms at 10 s
    t, seen = follow(PollSchedule(50.0), [pub], [val], 0.0, 21.0)
    lo, hi, true = _brackets(t, seen[:, 0], pub)
    late = true > 12.0
    assert np.median(np.abs(0.5 * (lo + hi) - true)[late]) < 0.002


def test_each_device_has_its_own_phase():
    a, va = _nvml_like(5)
    b, vb = _nvml_like(6)
    t, seen = follow(PollSchedule(50.0), [a, b], [va, vb], 0.0, 60.0)
    for d, pub in enumerate((a, b)):
        lo, hi, true = _brackets(t, seen[:, d], pub)
        assert np.median(np.abs(0.5 * (lo + hi) - true)[10:]) < 0.0025
    assert len(t) / 60.0 <= 2 * 50.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 0.4), min_size=2, max_size=200), st.floats(5.0, 200.0),
       st.lists(st.booleans(), min_size=1, max_size=50))
def test_never_stalls_or_repeats(gaps, rate_hz, changes):
    """Whatever the counter does, polls move forward by at least MIN_GAP_S and never wait longer than
    the longest period the schedule locks onto (or the rate's own period)."""
    pub = np.cumsum(gaps)
    values = np.cumsum([1.0 if changes[i % len(changes)] else 0.0 for i in range(len(pub))])
    t, _ = follow(PollSchedule(rate_hz), [pub], [values], 0.0, float(pub[-1]) + 0.5)
    d = np.diff(t)
    assert (d >= MIN_GAP_S - 1e-12).all()
    assert (d <= max(1.0 / rate_hz, MAX_PERIOD_S) + 1e-9).all()


class _RegularCounter(Meter):
    """A counter republished every 100 ms on the monotonic clock (a real thread reads it)."""

    source = "nvml"

    def __init__(self, lag_s: float = 0.0):
        self.lag_s = lag_s  # readings stamped this long before the read (as the simulated meter does)
        self.t0 = time.monotonic()
        self.reads = 0
        self.lock = threading.Lock()

    def read(self) -> Reading:
        t = time.monotonic() - self.lag_s
        with self.lock:
            self.reads += 1
        return Reading(t, (float(int((t - self.t0) / 0.1)),), self.source)

    def devices(self):
        return []

    def close(self) -> None:
        pass


@pytest.mark.parametrize("lag_s", [0.0, 0.25])
def test_sampler_thread_follows_the_schedule(lag_s):
    """Also when the meter stamps its readings earlier than the clock (a busy loop, once)."""
    meter = _RegularCounter(lag_s)
    with EnergyTimeline(meter, rate_hz=50.0) as tl:
        time.sleep(3.0)
    cps = tl.change_points()
    widths = np.array([c.t_s - c.t_prev_s for c in cps])[8:]
    assert len(cps) >= 20
    assert np.median(widths) < 0.012  # uniform 50 Hz polling brackets every change by 20 ms
    assert meter.reads < 3.2 * 50
