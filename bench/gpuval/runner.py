"""Running a schedule on the engine while wattprint's timeline polls the meter; Zeus alongside.

Each step is timed on ``time.monotonic()`` (the meters' clock) from just before its first kernel is
launched to just after the device has finished it (``Engine.sync``): device-synchronised timings. Steps
are written in the ``steps.jsonl`` format (:class:`StepRecord`), the readings as ``energy.jsonl``
(:class:`EnergySample`), so ``wattprint attribute`` can re-run any attribution from the files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gpuval.engine import Engine, Entry
from gpuval.probe import Probe
from wattprint.files import atomic_write
from wattprint.profiler.core.records import EnergySample, RequestEntry, StepRecord, encode_line, step_line
from wattprint.profiler.sidecar.sinks import SimulatedLoad
from wattprint.profiler.timeline.sampler import EnergyTimeline


@dataclass
class Run:
    name: str
    records: list[StepRecord]
    samples: list[EnergySample]
    energy_j: float  # counter energy over [t_start, t_end] (the timeline's counter rule)
    t_start: float  # first step's start
    t_end: float  # last step's end
    busy_s: float  # sum of step durations
    zeus_j: float | None = None
    zeus_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def window_s(self) -> float:
        return self.t_end - self.t_start

    @property
    def gap_s(self) -> float:
        return max(self.window_s - self.busy_s, 0.0)

    def write(self, out_dir: Path) -> dict:
        steps = out_dir / f"{self.name}.steps.jsonl"
        energy = out_dir / f"{self.name}.energy.jsonl"
        atomic_write(steps, b"".join(step_line(r) for r in self.records), mode=0o600)
        atomic_write(energy, b"".join(encode_line(s) for s in self.samples), mode=0o600)
        return {"steps": str(steps), "energy": str(energy)}


class Zeus:
    """Zeus's ``ZeusMonitor`` on the same GPU, when the package is importable and sees one."""

    def __init__(self, probe: Probe):
        self.monitor, self.status = None, "skipped"
        try:
            from zeus.monitor import ZeusMonitor
        except ImportError as exc:
            self.status = f"skipped: zeus is not importable ({exc})"
            return
        try:
            monitor = ZeusMonitor(gpu_indices=[probe.extra.get("cuda_index", 0)], cpu_indices=[])
        except Exception as exc:  # Zeus refuses machines it cannot measure
            self.status = f"skipped: ZeusMonitor failed: {type(exc).__name__}: {exc}"
            return
        if probe.kind != "nvml":  # a GPU is there, but the windows run on the simulated device's clock
            self.status = "skipped: the simulated meter's windows are on a virtual clock"
            return
        self.monitor, self.status = monitor, "measured"

    def begin(self, key: str) -> None:
        if self.monitor is not None:
            self.monitor.begin_window(key, sync_execution=False)

    def end(self, key: str) -> tuple[float | None, float | None]:
        if self.monitor is None:
            return None, None
        m = self.monitor.end_window(key, sync_execution=False)
        return float(sum(m.gpu_energy.values())), float(m.time)


def record(i: int, entries: list[Entry], t0: float, t1: float, model: str) -> StepRecord:
    reqs = [RequestEntry(e.rid, e.tokens if e.prefill else 0, 0 if e.prefill else e.tokens, e.context,
                         prompt_tokens=e.prompt_tokens or None, finished=e.last) for e in entries]
    return StepRecord(i, t0, t1, reqs, model)


def settle_s(probe: Probe) -> float:
    """How long to keep polling after the last step so the counter has published past it."""
    return (probe.sim.horizon_s + 0.35) if probe.sim is not None else 0.35


def work(rec: StepRecord, g) -> tuple[float, float]:
    """The step's cost-model FLOPs and bytes, by the same rule the sidecar drives the simulated meter."""
    got = []
    SimulatedLoad(lambda t0, t1, flops, bytes_: got.append((flops, bytes_))).observe_step(rec, g)
    return got[0] if got else (0.0, 0.0)


def _timeline(probe: Probe, rate_hz: float, maxlen: int) -> EnergyTimeline:
    timeline = EnergyTimeline(probe.meter, rate_hz=rate_hz, maxlen=maxlen)
    if not probe.virtual:
        timeline.start()
    return timeline


def execute(engine: Engine, probe: Probe, steps: list[list[Entry]], name: str, zeus: Zeus | None = None,
            rate_hz: float = 200.0, lead_s: float = 0.3) -> Run:
    """Run ``steps`` back to back while a timeline polls ``probe.meter`` at ``rate_hz``."""
    timeline = _timeline(probe, rate_hz, 2_000_000)
    records: list[StepRecord] = []
    g = engine.g
    try:
        probe.wait(lead_s, timeline)
        engine.sync()
        if zeus is not None:
            zeus.begin(name)
        for i, entries in enumerate(steps):
            if probe.virtual:  # the CPU runs the step; the simulated device's clock says how long it took
                engine.step(entries)
                t0 = probe.now()
                rec = record(i, entries, t0, t0, g.name)
                flops, bytes_ = work(rec, g)
                rec.t_end = t0 + probe.step_time_s(flops, bytes_)
                probe.sim.observe(rec.t_start, rec.t_end, flops, bytes_)
                probe.wait(rec.t_end - t0 + 1e-4, timeline)  # 0.1 ms of host time between steps
            else:
                t0 = time.monotonic()
                engine.step(entries)
                engine.sync()
                rec = record(i, entries, t0, time.monotonic(), g.name)
            records.append(rec)
        zj, zs = zeus.end(name) if zeus is not None else (None, None)
        probe.wait(settle_s(probe), timeline)
    finally:
        timeline.stop()
    t_start, t_end = records[0].t_start, records[-1].t_end
    energy = timeline.energy_between(t_start, t_end, device=0)
    samples = [EnergySample(r.t_s, 0, r.energy_j[0], r.source) for r in timeline.readings()]
    busy = sum(r.t_end - r.t_start for r in records)
    return Run(name, records, samples, energy, t_start, t_end, busy, zj, zs)


def idle_power_w(probe: Probe, seconds: float, rate_hz: float = 200.0) -> dict:
    """Power with nothing running, from the counter over ``seconds``."""
    timeline = _timeline(probe, rate_hz, 200_000)
    try:
        t0 = probe.now() - (probe.sim.horizon_s if probe.sim is not None else 0.0)
        probe.wait(seconds + settle_s(probe), timeline)
    finally:
        timeline.stop()
    inside = [c for c in timeline.change_points(0) if c.t_pub_s >= t0]
    if len(inside) < 2:
        return {"idle_power_w": None, "window_s": seconds, "note": "the counter changed fewer than twice"}
    a, b = inside[0], inside[-1]
    return {"idle_power_w": (b.energy_j - a.energy_j) / (b.t_pub_s - a.t_pub_s), "window_s": b.t_pub_s - a.t_pub_s,
            "counter_changes": len(inside)}
