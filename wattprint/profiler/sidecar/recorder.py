"""A trace recorder for the sidecar: keeps the engine's Hello, every step record and every meter reading
it receives, so that a run can be written as a trace and attributed offline (``wattprint profile``)."""

from __future__ import annotations

import threading
import time

from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.transport import messages as transport

#: readings kept before the first step: enough counter changes to place the first step's energy
LEAD_S = 2.0


class TraceRecorder:
    """Pass as ``Sidecar(recorder=...)``; the sidecar calls :meth:`add_message` for each message it
    processes and :meth:`add_reading` for each meter reading (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.hello: transport.Hello | None = None
        self._steps: list[StepRecord] = []
        self._readings: list[Reading] = []

    def add_message(self, msg: transport.Hello | transport.Steps) -> None:
        with self._lock:
            if isinstance(msg, transport.Hello):
                self.hello = msg
            else:
                self._steps.extend(msg.records)

    def add_reading(self, reading: Reading) -> None:
        with self._lock:
            self._readings.append(reading)

    def steps(self) -> list[StepRecord]:
        with self._lock:
            return list(self._steps)

    def readings(self, lead_s: float | None = LEAD_S) -> list[Reading]:
        """The readings from ``lead_s`` before the first step starts to the end (all of them before any
        step, or with ``lead_s=None``): the engine's start-up is not part of the workload."""
        with self._lock:
            readings = list(self._readings)
            t0 = self._steps[0].t_start if self._steps and lead_s is not None else None
        return readings if t0 is None else [r for r in readings if r.t_s >= t0 - lead_s]

    def complete(self, n_requests: int) -> bool:
        """True when ``n_requests`` requests have finished and every device's counter has changed after
        the last step (twice read after it, the last two readings different)."""
        with self._lock:
            steps = list(self._steps)
            readings = list(self._readings)
        finished = sum(1 for s in steps for r in s.requests if r.finished)
        if not steps or finished < n_requests:
            return False
        t_last = steps[-1].t_end
        after = [r for r in readings if r.t_s > t_last]
        before = [r for r in readings if r.t_s <= t_last]
        return bool(before and after and len(after) > 1
                    and all(a != b for a, b in zip(after[-1].energy_j, before[-1].energy_j))
                    and after[-1].energy_j != after[0].energy_j)

    def wait_complete(self, n_requests: int, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until :meth:`complete` (False when ``timeout_s`` passed first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.complete(n_requests):
                return True
            time.sleep(poll_s)
        return False
