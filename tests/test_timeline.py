"""EnergyTimeline with fake meters that publish a counter every 100 ms."""

from __future__ import annotations

import math
import threading
import time

import pytest

from wattprint.errors import InputError, MeterError
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading
from wattprint.profiler.timeline.sampler import EnergyTimeline


def true_energy(t: float, step_t: float = 1.0, p1: float = 100.0, p2: float = 300.0) -> float:
    """Cumulative joules of a device drawing p1 W before step_t and p2 W after."""
    return p1 * min(t, step_t) + p2 * max(0.0, t - step_t)


class PublishingMeter(Meter):
    """Counter republished every ``period_s`` (at phase + k * period), read at the fake clock's time."""

    source = "nvml"

    def __init__(self, clock, period_s=0.1, phase_s=0.013, n_devices=2, fail_every=0):
        self.clock = clock
        self.period_s = period_s
        self.phase_s = phase_s
        self.n = n_devices
        self.fail_every = fail_every
        self.calls = 0

    @property
    def devices(self):
        return [DeviceInfo(i, f"fake{i}") for i in range(self.n)]

    def published(self, t: float) -> float:
        k = math.floor((t - self.phase_s) / self.period_s)
        return self.phase_s + k * self.period_s

    def read(self) -> Reading:
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise MeterError("transient")
        t = self.clock()
        p = self.published(t)
        base = true_energy(max(p, 0.0))
        return Reading(t_s=t, energy_j=tuple(base * (d + 1) for d in range(self.n)), source=self.source)


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def drive(timeline, clock, t_end, dt=0.02):
    n = 0
    while clock.t <= t_end + 1e-9:
        timeline.sample_once()
        clock.t = round(clock.t + dt, 9)
        n += 1
    return n


def test_change_points_and_energy_between():
    clock = FakeClock()
    meter = PublishingMeter(clock)
    tl = EnergyTimeline(meter, rate_hz=50)
    drive(tl, clock, 2.0)
    cps = tl.change_points(0)
    # publishes at 0.013, 0.113, ..., 1.913 (20): each seen once, by the first sample after it
    assert len(cps) == 20
    assert all(cp.t_s - cp.t_prev_s == pytest.approx(0.02) for cp in cps)
    assert all(cp.t_prev_s < meter.phase_s + k * 0.1 <= cp.t_s for k, cp in enumerate(cps))
    # constant power: exact whatever the publish phase
    assert tl.energy_between(0.3, 0.7, device=0) == pytest.approx(40.0, abs=1e-6)
    assert tl.energy_between(0.3, 0.7, device=1) == pytest.approx(80.0, abs=1e-6)
    assert tl.energy_between(0.3, 0.7) == pytest.approx(120.0, abs=1e-6)
    # across the power step: linear interpolation between publish estimates, off by < one period's bend
    got = tl.energy_between(0.5, 1.5, device=0)
    want = true_energy(1.5) - true_energy(0.5)
    assert got == pytest.approx(want, abs=2.0)
    assert tl.power_w(0) == pytest.approx(300.0)
    assert tl.power_w() == pytest.approx(900.0)
    assert tl.latest().t_s == pytest.approx(2.0)
    assert tl.energy_between(1.0, 1.0) == 0.0
    with pytest.raises(InputError):
        tl.energy_between(2.0, 1.0)
    with pytest.raises(InputError):
        tl.energy_between(0.0, 1.0, device=5)


def test_midpoint_estimate_beats_sample_time():
    clock = FakeClock()
    # publish just after a sample: midpoint puts it 10 ms late, the sample time 19 ms late
    meter = PublishingMeter(clock, phase_s=0.001, n_devices=1)
    mid = EnergyTimeline(meter, publish_time="midpoint")
    drive(mid, clock, 2.0)
    clock.t = 0.0
    meter2 = PublishingMeter(clock, phase_s=0.001, n_devices=1)
    samp = EnergyTimeline(meter2, publish_time="sample")
    drive(samp, clock, 2.0)
    want = true_energy(1.05) - true_energy(0.95)
    assert abs(mid.energy_between(0.95, 1.05) - want) < abs(samp.energy_between(0.95, 1.05) - want)


def test_window_outside_observed_span_is_clamped():
    clock = FakeClock(t=10.0)
    meter = PublishingMeter(clock, n_devices=1)
    tl = EnergyTimeline(meter)
    with pytest.raises(MeterError):
        tl.energy_between(0, 1)
    assert tl.latest() is None and tl.power_w() is None
    drive(tl, clock, 11.0)
    inside = tl.energy_between(10.0, 11.0)
    assert tl.energy_between(0.0, 100.0) == pytest.approx(inside)
    assert inside == pytest.approx(300.0, rel=0.05)


def test_buffer_bounded_and_drops_counted():
    clock = FakeClock()
    tl = EnergyTimeline(PublishingMeter(clock), maxlen=10, max_change_points=4)
    n = drive(tl, clock, 1.0)
    assert n == 51
    assert len(tl.readings()) == 10
    assert tl.samples == 51
    assert tl.dropped == 41
    assert len(tl.change_points(0)) == 4
    assert tl.dropped_change_points == 2 * (10 - 4)  # two devices
    # the retained change points still answer windows inside them
    assert tl.energy_between(0.75, 0.95, device=0) == pytest.approx(20.0, abs=1e-6)


def test_meter_errors_counted_not_fatal():
    clock = FakeClock()
    meter = PublishingMeter(clock, fail_every=3)
    tl = EnergyTimeline(meter)
    drive(tl, clock, 1.0)
    assert tl.errors == 17
    assert isinstance(tl.last_error, MeterError)
    assert tl.samples == 51 - 17


def test_rejected_readings():
    tl = EnergyTimeline(PublishingMeter(FakeClock()))
    assert tl.ingest(Reading(1.0, (1.0, 1.0), "nvml"))
    assert not tl.ingest(Reading(1.0, (2.0, 2.0), "nvml"))  # same time
    assert not tl.ingest(Reading(2.0, (2.0,), "nvml"))  # device count changed
    assert tl.rejected == 2
    assert tl.samples == 1


def test_a_counter_that_goes_back_is_stitched_not_rejected():
    """A counter reset (driver reload) restarts from zero: the energy since is the new value (the one
    counter rule of timeline/counter.py, as offline and online attribution apply it)."""
    tl = EnergyTimeline(PublishingMeter(FakeClock()), publish_time="sample")
    for t, e in ((1.0, 10.0), (2.0, 20.0), (3.0, 5.0), (4.0, 15.0)):
        assert tl.ingest(Reading(t, (e,), "nvml"))
    assert tl.counter_resets == 1
    assert [cp.energy_j for cp in tl.change_points()] == [20.0, 25.0, 35.0]
    assert tl.energy_between(2.0, 4.0) == pytest.approx(15.0)  # 5 J after the reset + 10 J


def test_subscribers_get_every_reading_and_their_errors_are_counted():
    clock = FakeClock()
    got = []
    tl = EnergyTimeline(PublishingMeter(clock), on_reading=got.append)

    def broken(reading):
        raise RuntimeError("subscriber bug")

    tl.subscribe(broken)
    drive(tl, clock, 0.2)
    assert len(got) == 11 and got[-1] == tl.latest()
    assert tl.callback_errors == 11
    tl.unsubscribe(broken)
    drive(tl, clock, 0.3)
    assert tl.callback_errors == 11 and len(got) == 16


class RealTimeMeter(Meter):
    """Publishes 100 W worth of joules every 100 ms of real monotonic time; fails now and then."""

    source = "nvml"

    def __init__(self):
        self.t0 = time.monotonic()
        self.calls = 0
        self.lock = threading.Lock()

    @property
    def devices(self):
        return [DeviceInfo(0, "rt")]

    def read(self):
        with self.lock:
            self.calls += 1
            if self.calls % 5 == 0:
                raise RuntimeError("flaky driver")
        t = time.monotonic()
        k = math.floor((t - self.t0) / 0.1)
        return Reading(t, (100.0 * 0.1 * k,), self.source)


def test_thread_samples_in_background():
    meter = RealTimeMeter()
    seen = []
    with EnergyTimeline(meter, rate_hz=200, on_reading=seen.append) as tl:
        assert tl.running
        deadline = time.monotonic() + 3.0
        while len(tl.change_points(0) if tl.latest() else []) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not tl.running
    assert tl.errors >= 1  # exceptions did not stop the thread
    cps = tl.change_points(0)
    assert len(cps) >= 6
    a, b = cps[1].t_mid_s, cps[-1].t_mid_s
    assert tl.energy_between(a, b) == pytest.approx(100.0 * (b - a), rel=0.25)
    assert tl.power_w(0) == pytest.approx(100.0, rel=0.5)
    assert seen and seen[-1] == tl.latest()
    n = tl.samples
    time.sleep(0.05)
    assert tl.samples == n  # stopped


def test_bad_arguments():
    with pytest.raises(InputError):
        EnergyTimeline(PublishingMeter(FakeClock()), rate_hz=0)
    with pytest.raises(InputError):
        EnergyTimeline(PublishingMeter(FakeClock()), maxlen=1)
    with pytest.raises(InputError):
        EnergyTimeline(PublishingMeter(FakeClock()), publish_time="never")


def test_publish_time_auto_by_source():
    class Rapl(PublishingMeter):
        source = "rapl"

    class Replayed(PublishingMeter):
        source = "replay:cputime-estimate"

    assert EnergyTimeline(PublishingMeter(FakeClock())).publish_time == "midpoint"
    assert EnergyTimeline(Rapl(FakeClock())).publish_time == "sample"
    assert EnergyTimeline(Replayed(FakeClock())).publish_time == "sample"
