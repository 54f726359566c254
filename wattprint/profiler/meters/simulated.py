"""The simulated meter: the GPU twin (:mod:`wattprint.profiler.twin.power`) as a live :class:`Meter`,
driven by ``observe()`` calls, for tests and for machines with no GPU.

Its source is ``simulated``: nothing it reports is ever a measurement.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.core.hardware import HardwareProfile, load_profile
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading
from wattprint.profiler.twin.power import SOURCE, GpuTwin, PowerTrace, SensorEffects


# --------------------------------------------------------------------------------------- live meter
@dataclass
class _LiveDevice:
    trace: PowerTrace
    effects: SensorEffects
    next_publish_s: float
    value_j: float = 0.0


@dataclass
class SimulatedMeter(Meter):
    """The twin as a live meter: ``observe()`` reports activity; ``read()`` returns the sensor's counter.

    With no activity reported, the twin idles. ``time_fn`` is the clock (``time.monotonic``).
    Activity is accepted up to ``horizon_s`` late: the counter publishes energy up to
    ``now - horizon_s`` so that step records arriving a little after their step still count. Each
    reading is therefore stamped ``now - horizon_s``: the time its value refers to.
    """

    profile: HardwareProfile | str = "h100-sxm"
    n_devices: int = 1
    seed: int = 0
    horizon_s: float = 0.25
    time_fn: object = time.monotonic
    source: str = SOURCE
    _devices: list = field(default_factory=list, init=False)

    def __post_init__(self):
        if isinstance(self.profile, str):
            self.profile = load_profile(self.profile)
        self.twin = GpuTwin(self.profile)
        rng = np.random.default_rng(self.seed)
        self._rng = rng
        self._lock = threading.Lock()
        now = self.time_fn()
        self._live = [
            _LiveDevice(PowerTrace(now - 3600.0, self.profile.idle_power_w), SensorEffects.realistic(rng), now)
            for _ in range(self.n_devices)
        ]
        self._devices = [DeviceInfo(i, f"simulated {self.profile.name}") for i in range(self.n_devices)]
        self._t0 = now

    @property
    def devices(self) -> list[DeviceInfo]:
        return self._devices

    def observe(self, t_start_s: float, t_end_s: float, flops: float, bytes_: float) -> None:
        """Activity on every device (tensor-parallel work is split evenly). Late or overlapping spans
        are clipped to what the trace has not yet published."""
        with self._lock:
            for dev in self._live:
                start = max(t_start_s, dev.trace.t_last_s, self._published_until(dev))
                if t_end_s <= start:
                    continue
                dt, power, _ = self.twin.step(flops / self.n_devices, bytes_ / self.n_devices, t_end_s - start)
                energy = power * dt
                self.twin.append_busy(dev.trace, start, t_end_s, energy / (t_end_s - start))

    def _published_until(self, dev: _LiveDevice) -> float:
        return dev.next_publish_s - dev.effects.publish_period_s - self.horizon_s

    def read(self) -> Reading:
        now = self.time_fn()
        with self._lock:
            out = []
            for dev in self._live:
                while dev.next_publish_s <= now:
                    t_pub = dev.next_publish_s - self.horizon_s - dev.effects.latency_s
                    dev.value_j = float(
                        math.floor(dev.effects.gain * float(dev.trace.energy_until(t_pub)) / dev.effects.quantum_j)
                        * dev.effects.quantum_j
                    )
                    dev.next_publish_s += max(
                        self._rng.normal(dev.effects.publish_period_s, dev.effects.publish_jitter_s),
                        0.5 * dev.effects.publish_period_s,
                    )
                out.append(dev.value_j)
        return Reading(now - self.horizon_s, tuple(out), self.source)
