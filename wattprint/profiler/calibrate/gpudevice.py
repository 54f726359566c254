"""Calibration's real GPU: the kernels launched with torch/triton, the energy counter read through the
NVML meter (:class:`~wattprint.profiler.meters.nvml.NvmlMeter`) by a sampler thread.

It offers the device API the procedure drives (``idle``, ``run``, ``cooldown``, ``close``, ``n_sm``,
``tdp_w``, ``name``, ``driver``, ``source``), like
:class:`~wattprint.profiler.calibrate.simdevice.SimulatedDevice`. Every NVML call goes through the
meter and its device class.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from wattprint.errors import MeterError
from wattprint.profiler.calibrate.analysis import RawRun
from wattprint.profiler.calibrate.launchers import make_launcher
from wattprint.profiler.calibrate.plan import RunSpec, launches_needed


class GpuDevice:
    """A real GPU: the kernels launched with torch/triton, energy from :class:`NvmlMeter` polled by a
    sampler thread. Opening it raises :class:`MeterError` (or ImportError) when anything is missing."""

    source = "nvml"

    def __init__(self, index: int, poll_hz: float = 500.0, seed: int = 0, *, meter=None, torch_device=None):
        """Open GPU ``index`` (an NVML index; the CUDA device with the same UUID runs the kernels).

        For tests: ``meter`` replaces the NVML meter and ``torch_device`` (e.g. ``"cpu"`` with
        ``TRITON_INTERPRET=1``) runs the kernels there, skipping the CUDA and NVML queries.
        """
        if meter is None:
            from wattprint.profiler.meters.nvml import NvmlMeter  # lazy: only this path needs NVML

            meter = NvmlMeter(devices=[index])
        self.meter = meter
        try:
            info = self.meter.devices[0]
            try:
                import torch
            except ImportError as exc:
                raise MeterError(f"calibrating a GPU needs torch with CUDA: {exc}") from exc
            from wattprint.kernels import require_triton

            self.torch = torch
            self.name = info.name
            if torch_device is not None:
                require_triton()
                self.device = torch.device(torch_device)
                self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
                self.n_sm = 1
                self.driver = "none"
                self.tdp_w = float(info.extra.get("tdp_w", 1e9))
            else:
                if not torch.cuda.is_available():
                    raise MeterError("torch sees no CUDA device (a CPU-only torch build, or no driver)")
                require_triton()
                cuda_index = _cuda_index_for(torch, info.extra.get("uuid"), index)
                torch.cuda.set_device(cuda_index)
                self.device = torch.device("cuda", cuda_index)
                self._sync = torch.cuda.synchronize
                self.n_sm = int(torch.cuda.get_device_properties(cuda_index).multi_processor_count)
                self.driver = _driver_version(self.meter)
                self.tdp_w = self.meter.gpus[0].power_limit_w()
            self.generator = torch.Generator(device=self.device).manual_seed(seed)
        except BaseException:
            self.meter.close()
            raise
        self.period_s = 1.0 / poll_hz
        self._lock = threading.Lock()
        self._t: list[float] = []
        self._e: list[float] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="wattprint-calibrate-poller", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.meter.read()
            except MeterError as exc:
                self._error = exc
                return
            with self._lock:
                self._t.append(r.t_s)
                self._e.append(r.energy_j[0])
            time.sleep(self.period_s)

    def polls(self, t0_s: float, t1_s: float) -> tuple[np.ndarray, np.ndarray]:
        if self._error is not None:
            raise MeterError(f"reading the energy counter failed: {self._error}")
        with self._lock:
            t = np.asarray(self._t)
            e = np.asarray(self._e)
            keep = t >= time.monotonic() - 120.0  # the sampler's memory stays bounded
            self._t, self._e = list(t[keep]), list(e[keep])
        sel = (t >= t0_s) & (t <= t1_s)
        return t[sel], e[sel]

    def idle(self, seconds: float):
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        pt, pe = self.polls(t0, t1)
        return t0, t1, pt, pe

    def cooldown(self, seconds: float) -> None:
        time.sleep(seconds)

    def run(self, spec: RunSpec, seconds: float, rise_s: float) -> RawRun:
        sync = self._sync
        launch, buffers = make_launcher(spec, self.torch, self.device, self.generator)
        try:
            launch()  # compiles
            sync()
            t0 = time.monotonic()
            for _ in range(2):
                launch()
            sync()
            t_launch = (time.monotonic() - t0) / 2
            n = launches_needed(t_launch, seconds, rise_s)
            batch = max(1, min(n, int(0.05 / max(t_launch, 1e-9))))  # synchronise about every 50 ms
            done_t, done_n = [], []
            done = 0
            t_start = time.monotonic()
            t_min_end = t_start + rise_s + seconds  # the launch-time estimate from 2 launches can be off
            while done < n or time.monotonic() < t_min_end:
                k = min(batch, n - done) if done < n else batch
                for _ in range(k):
                    launch()
                sync()
                done += k
                done_t.append(time.monotonic())
                done_n.append(done)
        finally:
            buffers.clear()
            if self.device.type == "cuda":
                self.torch.cuda.empty_cache()
        time.sleep(0.3)  # let the counter publish past the end
        pt, pe = self.polls(t_start - 0.5, time.monotonic())
        return RawRun(spec, t_start, np.asarray(done_t), np.asarray(done_n), pt, pe)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.meter.close()


def _cuda_index_for(torch, uuid: str | None, fallback: int) -> int:
    """The CUDA device with NVML's UUID (CUDA and NVML may number GPUs differently)."""
    if uuid:
        want = uuid.removeprefix("GPU-").lower()
        for i in range(torch.cuda.device_count()):
            got = str(getattr(torch.cuda.get_device_properties(i), "uuid", "")).removeprefix("GPU-").lower()
            if got == want:
                return i
    return fallback


def _driver_version(meter) -> str:
    """The driver's version for the profile's record; ``"unknown"`` when NVML cannot tell (informative only)."""
    try:
        return meter.driver_version()
    except MeterError:
        return "unknown"
