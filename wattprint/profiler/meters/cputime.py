"""An *estimate* of CPU energy from CPU time, for machines without RAPL (source ``cputime-estimate``).

    energy_j = active_power_per_core_w * busy CPU seconds + idle_power_w * wall seconds

counted from the moment the meter is opened. Busy CPU seconds are those of the watched processes
(``pids``, with all their descendants) or, without ``pids``, the whole system's busy time
(``psutil.cpu_times()``: user + nice + system + irq + softirq; idle, iowait and steal excluded).
The defaults come from the ``cpu`` hardware profile: ``idle_power_w`` and
``(tdp_w - idle_power_w) / psutil.cpu_count()`` per core. This is never a measurement.

Processes are followed as a tree: each process seen (keyed by pid and creation time) contributes the
CPU time it had at its last poll, so the figure stays monotone when children exit. CPU time a child
spends between its last poll and its exit, and children that live less than a poll period, are missed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import psutil

from wattprint.errors import MeterError
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading

_BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq")


def default_powers() -> tuple[float, float]:
    """``(active_power_per_core_w, idle_power_w)`` from the shipped ``cpu`` hardware profile."""
    from wattprint.profiler.core.hardware import load_profile

    profile = load_profile("cpu")
    cores = psutil.cpu_count() or 1
    return max(0.0, profile.tdp_w - profile.idle_power_w) / cores, profile.idle_power_w


def system_busy_s() -> float:
    """Busy CPU seconds of the whole machine, all cores."""
    times = psutil.cpu_times()
    return float(sum(getattr(times, f, 0.0) for f in _BUSY_FIELDS))


def _proc_cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


class CpuTimeMeter(Meter):
    """CPU energy estimated from CPU time. One device."""

    source = "cputime-estimate"

    def __init__(
        self,
        pids: Iterable[int] | None = None,
        *,
        active_power_per_core_w: float | None = None,
        idle_power_w: float | None = None,
    ):
        if active_power_per_core_w is None or idle_power_w is None:
            default_active, default_idle = default_powers()
            active_power_per_core_w = (
                default_active if active_power_per_core_w is None else active_power_per_core_w
            )
            idle_power_w = default_idle if idle_power_w is None else idle_power_w
        if active_power_per_core_w < 0 or idle_power_w < 0:
            raise MeterError("cputime meter: powers must be non-negative")
        self.active_power_per_core_w = float(active_power_per_core_w)
        self.idle_power_w = float(idle_power_w)
        self._lock = threading.Lock()
        self.pids = None if pids is None else list(pids)
        self._roots: list[psutil.Process] = []
        if self.pids is not None:
            if not self.pids:
                raise MeterError("cputime meter: empty pid list")
            for pid in self.pids:
                try:
                    self._roots.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    raise MeterError(f"cputime meter: no process with pid {pid}") from None
                except psutil.AccessDenied:
                    raise MeterError(f"cputime meter: no permission to watch pid {pid}") from None
        # (pid, create_time) -> CPU seconds at its last poll; baseline at open
        self._seen: dict[tuple[int, float], float] = {}
        self._last_busy_s = 0.0
        self._t0 = time.monotonic()
        self._base_cpu_s = self._last_busy_s = self._busy_s()
        what = (
            "system busy time" if self.pids is None else f"pids {', '.join(map(str, self.pids))} + children"
        )
        self._devices = [
            DeviceInfo(
                index=0,
                name=f"cpu (estimate from {what})",
                extra={
                    "active_power_per_core_w": self.active_power_per_core_w,
                    "idle_power_w": self.idle_power_w,
                    "pids": self.pids,
                },
            )
        ]

    def _busy_s(self) -> float:
        """Busy CPU seconds so far (system, or the watched trees as last seen)."""
        if self.pids is None:
            return system_busy_s()
        for root in self._roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            except psutil.AccessDenied as exc:
                raise MeterError(f"cputime meter: no permission to read pid {root.pid}: {exc}") from exc
            for proc in procs:
                try:
                    key = (proc.pid, proc.create_time())
                    cpu_s = _proc_cpu_s(proc)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                self._seen[key] = max(cpu_s, self._seen.get(key, 0.0))
        return sum(self._seen.values())

    @property
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    def read(self) -> Reading:
        with self._lock:
            # system counters can step back a little on some kernels: keep the figure monotone
            busy_s = self._last_busy_s = max(self._busy_s(), self._last_busy_s)
            t_s = time.monotonic()
            cpu_s = busy_s - self._base_cpu_s
            energy_j = self.active_power_per_core_w * cpu_s + self.idle_power_w * (t_s - self._t0)
            return Reading(t_s=t_s, energy_j=(energy_j,), source=self.source)
