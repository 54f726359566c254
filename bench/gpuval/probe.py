"""The device under test and its meter: a real GPU through NVML, or the simulated twin on the CPU.

:class:`Probe` hides the difference from the checks. On a GPU, time is real: steps are timed on
``time.monotonic()`` around a device synchronisation and wattprint's :class:`EnergyTimeline` polls NVML
on its thread. Simulated, the engine really runs every step on the CPU (its batches, chunks and KV
cache), but the **clock is virtual**: a step lasts what the simulated device's roofline gives for its
cost-model FLOPs and bytes, the twin's meter is driven by the step (``SimulatedMeter.observe`` with the
v1 cost model's work, as the sidecar's ``SimulatedLoad`` does) and polled on that clock. A shared
2-core CPU's scheduling noise would otherwise make the step durations, and so the twin's energy, differ
between the isolated and the mixed runs by more than the error being measured; and no wall time is
spent waiting for a counter. Every figure it gives is labelled ``simulated``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from wattprint.profiler.core.costmodel import ModelGeometry
from wattprint.profiler.core.hardware import HardwareProfile, load_profile
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.meters.simulated import SimulatedMeter
from wattprint.profiler.sidecar.sinks import SimulatedLoad


def sim_profile() -> HardwareProfile:
    """The simulated device's TRUE profile, sized for the tiny CPU model's work so that its steps last
    5-50 ms: the shipped ``cpu`` profile's static and idle power, ~120 W of compute and ~60 W of memory
    power at the peaks (dynamic power a real share of the total, as on a GPU)."""
    from dataclasses import replace

    peak_f, peak_b = 4.0e10, 2.0e9
    return replace(load_profile("cpu"), name="simulated-small-device", peak_flops=peak_f, peak_bandwidth_bytes_s=peak_b,
                   energy_per_flop_j=120.0 / peak_f, energy_per_byte_j=60.0 / peak_b, tdp_w=400.0)


class VirtualClock:
    def __init__(self, t0: float = 1000.0):
        self.t = t0

    def __call__(self) -> float:
        return self.t


@dataclass
class Probe:
    kind: str  # "nvml" or "simulated"
    meter: object
    device_name: str
    driver: str

    torch_device: str  # where the engine runs
    nvml_gpu: object = None  # NVML's device object (wattprint's NvmlGpu): counter and instant power
    extra: dict = field(default_factory=dict)

    # simulated only: the twin's meter, the virtual clock and the rate the meter is polled on it
    sim: SimulatedMeter | None = None
    clock: VirtualClock | None = None
    poll_hz: float = 200.0
    _next_poll: float = 0.0
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    @property
    def source(self) -> str:
        return self.meter.source

    @property
    def virtual(self) -> bool:
        return self.clock is not None

    def now(self) -> float:
        return self.clock.t if self.clock is not None else time.monotonic()

    def wait(self, seconds: float, timeline) -> None:
        """Let ``seconds`` pass while ``timeline`` is fed: real time (its thread polls), or virtual time
        (polled here at ``poll_hz``)."""
        if self.clock is None:
            time.sleep(seconds)
            return
        end = self.clock.t + seconds
        self._next_poll = max(self._next_poll, self.clock.t)
        while self._next_poll <= end:
            self.clock.t = self._next_poll
            timeline.ingest(self.meter.read())
            self._next_poll += 1.0 / self.poll_hz
        self.clock.t = end

    def step_time_s(self, flops: float, bytes_: float) -> float:
        """Simulated: how long the device takes for a step's work (a smooth roofline at 80 % of peak
        FLOP/s and 90 % of peak bandwidth, 0.5 ms of launch overhead, 1 % jitter)."""
        p = self.sim.profile
        t_f, t_b = flops / (0.8 * p.peak_flops), bytes_ / (0.9 * p.peak_bandwidth_bytes_s)
        return (5e-4 + (t_f ** 3 + t_b ** 3) ** (1.0 / 3.0)) * float(np.clip(1.0 + self._rng.normal(0, 0.01), 0.95, 1.05))

    def observe_step(self, record: StepRecord, g: ModelGeometry) -> None:
        if self.sim is not None:
            SimulatedLoad(self.sim.observe).observe_step(record, g)

    def close(self) -> None:
        self.meter.close()


def open_nvml(index: int = 0) -> Probe:
    """The GPU with NVML index ``index`` (raises MeterError without NVML or a GPU), and the CUDA device
    with the same UUID (CUDA and NVML may number GPUs differently)."""
    import torch

    from wattprint.profiler.calibrate.gpudevice import _cuda_index_for
    from wattprint.profiler.meters.nvml import NvmlMeter

    meter = NvmlMeter(devices=[index])
    gpu = meter.gpus[0]
    try:
        driver = meter.driver_version()
    except Exception:  # informative only
        driver = "unknown"
    info = meter.devices[0]
    cuda_index = _cuda_index_for(torch, info.extra.get("uuid"), index)
    return Probe("nvml", meter, info.name, driver, f"cuda:{cuda_index}", nvml_gpu=gpu,
                 extra={"uuid": info.extra.get("uuid"), "method": info.extra.get("method"), "cuda_index": cuda_index,
                        "power_limit_w": gpu.power_limit_w(), "cuda_name": torch.cuda.get_device_name(cuda_index),
                        "cuda": torch.version.cuda})


def open_simulated(profile: HardwareProfile, seed: int = 0) -> Probe:
    clock = VirtualClock()
    meter = SimulatedMeter(profile=profile, seed=seed, time_fn=clock)
    gain = meter._live[0].effects.gain  # reported: the simulated board's gain error
    return Probe("simulated", meter, f"simulated ({profile.name})", "simulated", "cpu", sim=meter, clock=clock,
                 extra={"sensor_gain": gain, "clock": "virtual", "true_profile": profile.to_dict()},
                 _rng=np.random.default_rng(seed + 7))
