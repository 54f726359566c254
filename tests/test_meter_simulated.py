"""The simulated meter stamps each reading with the time its value refers to."""

import pytest

from wattprint.profiler.meters.simulated import SimulatedMeter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_readings_are_stamped_with_the_time_their_value_refers_to():
    clock = Clock()
    m = SimulatedMeter("h100-sxm", seed=0, horizon_s=0.25, time_fn=clock)
    clock.t += 5.0
    before = m.read()
    assert before.t_s == pytest.approx(clock.t - 0.25)
    # a busy second that ends 0.1 s before the read: not yet in the counter's value (inside the horizon)
    m.observe(clock.t - 1.1, clock.t - 0.1, flops=5e14, bytes_=3e12)
    clock.t += 0.0001
    r = m.read()
    assert r.energy_j[0] - before.energy_j[0] < 50.0  # idle-level energy only: the busy span is still to come
    clock.t += 1.0
    later = m.read()
    assert later.energy_j[0] - r.energy_j[0] > 300.0  # now published: ~1 s near full power
    assert later.t_s == pytest.approx(clock.t - 0.25)
