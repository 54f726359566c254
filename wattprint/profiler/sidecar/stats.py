"""The sidecar's own health figures: drop and error counters, a rate-limited error log, and the device
power over the last second of meter readings.

Every thread touches these, so each class has its own small lock and never calls out while holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from wattprint.profiler.meters.base import Reading

log = logging.getLogger("wattprint.profiler.sidecar")

#: the span of readings the exported device power is computed over
POWER_WINDOW_S = 1.0


class RateLimitedLog:
    """Log an error at most once per ``interval_s`` per key (the rest are counted, not printed)."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, msg: str, *args, exc_info=True) -> None:
        now = time.monotonic()
        with self._lock:
            due = now - self._last.get(key, -1e18) >= self.interval_s
            if due:
                n = self._suppressed.pop(key, 0)
                self._last[key] = now
            else:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
        if due:
            suffix = f" ({n} similar suppressed)" if n else ""
            log.error(msg + suffix, *args, exc_info=exc_info)


class Counters:
    """``wattprint_dropped_records_total{reason}``, ``wattprint_internal_errors_total{where}`` and the
    count of messages received; :meth:`fail` is what every thread calls when wattprint code raised."""

    def __init__(self, rlog: RateLimitedLog | None = None):
        self._lock = threading.Lock()
        self._dropped: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._messages = 0
        self._rlog = rlog or RateLimitedLog()

    def count_drop(self, reason: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def count_error(self, where: str) -> None:
        with self._lock:
            self._errors[where] = self._errors.get(where, 0) + 1

    def count_message(self) -> None:
        with self._lock:
            self._messages += 1

    def fail(self, where: str, msg: str, *args) -> None:
        """Count an internal error at ``where`` and log it (with the traceback, rate-limited)."""
        self.count_error(where)
        self._rlog(where, "wattprint sidecar: " + msg, *args)

    def warn(self, key: str, msg: str, *args) -> None:
        """Log a problem of the input (no traceback, rate-limited per ``key``); counts nothing."""
        self._rlog(key, "wattprint sidecar: " + msg, *args, exc_info=False)

    def dropped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._dropped)

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    @property
    def messages(self) -> int:
        with self._lock:
            return self._messages


class PowerWindow:
    """The meter readings of the last :data:`POWER_WINDOW_S` (at least two), for the exported power and
    for a new attributor that needs the readings just before its first step."""

    def __init__(self, window_s: float = POWER_WINDOW_S):
        self.window_s = window_s
        self._readings: deque[Reading] = deque()
        self._last_t_s: float | None = None
        self._lock = threading.Lock()

    def add(self, reading: Reading) -> None:
        with self._lock:
            rs = self._readings
            rs.append(reading)
            while len(rs) > 2 and reading.t_s - rs[1].t_s >= self.window_s:
                rs.popleft()
            self._last_t_s = reading.t_s

    def recent(self) -> list[Reading]:
        with self._lock:
            return list(self._readings)

    @property
    def last_t_s(self) -> float | None:
        """The time of the newest reading (None before the first)."""
        with self._lock:
            return self._last_t_s

    def power_w(self) -> list[float]:
        """Each device's mean power over the window (empty with fewer than two readings)."""
        with self._lock:
            if len(self._readings) < 2:
                return []
            a, b = self._readings[0], self._readings[-1]
        dt = b.t_s - a.t_s
        if dt <= 0:
            return []
        return [(eb - ea) / dt for ea, eb in zip(a.energy_j, b.energy_j, strict=False)]
