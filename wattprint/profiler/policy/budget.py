"""Rolling energy windows: the joules charged to a stratum over its last ``window_s`` seconds.

The window is cut into ``buckets`` equal slices; a charge lands in the slice of its time and leaves the
window whole, ``window_s`` after its slice ends (a charge may count up to one slice longer than
``window_s``: the window errs toward caution). Memory is bounded: at most ``buckets + 1`` slices whatever
is charged. Time never runs backward: a charge or a query earlier than the latest time the window was given
is taken at that time. Charges that are not finite, non-negative joules are refused and counted.

Besides the energy, a window keeps, for the charges that came with one, the ideal energy of their work
and their own energy (``graded_j``): the window's efficiency is ``ideal_j / graded_j``
(:mod:`wattprint.profiler.core.efficiency`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

DEFAULT_BUCKETS = 64


class WindowTotals(NamedTuple):
    energy_j: float = 0.0
    graded_j: float = 0.0  # energy of the charges that came with an ideal energy
    ideal_j: float = 0.0


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RollingWindow:
    """Joules charged over the last ``window_s`` seconds, in at most ``buckets + 1`` slices."""

    __slots__ = ("window_s", "width_s", "max_slices", "_slices", "_last_t", "refused")

    def __init__(self, window_s: float, buckets: int = DEFAULT_BUCKETS):
        if not (_ok(window_s) and window_s > 0) or int(buckets) < 1:
            raise ValueError(f"a rolling window needs window_s > 0 and buckets >= 1, got {window_s!r}, {buckets!r}")
        self.window_s = float(window_s)
        self.width_s = self.window_s / int(buckets)
        self.max_slices = int(buckets) + 1
        self._slices: deque[list] = deque()  # [index, energy_j, graded_j, ideal_j], oldest first
        self._last_t = -math.inf
        #: charges refused (not finite, negative)
        self.refused = 0

    def __len__(self) -> int:
        return len(self._slices)

    def _expires(self, index: int) -> float:
        return (index + 1) * self.width_s + self.window_s

    def _now(self, t: float) -> float:
        """The window's clock: the latest time it was given (a charge or a query)."""
        if t > self._last_t:
            self._last_t = t
        return self._last_t

    def _expire(self, now: float) -> None:
        s = self._slices
        while s and self._expires(s[0][0]) <= now:
            s.popleft()

    def charge(self, t: float, energy_j: float, ideal_j: float | None = None) -> bool:
        """Charge ``energy_j`` at time ``t`` (seconds, any monotonic clock); False when refused."""
        if not (_ok(t) and _ok(energy_j) and energy_j >= 0) or (ideal_j is not None and not (_ok(ideal_j) and ideal_j >= 0)):
            self.refused += 1
            return False
        t = self._now(float(t))
        index = math.floor(t / self.width_s)
        s = self._slices
        if not s or s[-1][0] != index:
            s.append([index, 0.0, 0.0, 0.0])
        last = s[-1]
        last[1] += energy_j
        if ideal_j is not None:
            last[2] += energy_j
            last[3] += ideal_j
        self._expire(t)
        while len(s) > self.max_slices:  # unreachable while charges keep time; a guard all the same
            s.popleft()
        return True

    def totals(self, now: float) -> WindowTotals:
        """What the window holds at ``now``."""
        now = self._now(now)
        self._expire(now)
        e = g = i = 0.0
        for _, de, dg, di in reversed(self._slices):  # the order wait_s sums in: the same floats
            e += de
            g += dg
            i += di
        return WindowTotals(e, g, i)

    def wait_s(self, now: float, ok: Callable[[WindowTotals], bool]) -> float:
        """Seconds from ``now`` until ``ok`` holds with no new charge (0 when it holds now). An empty
        window must satisfy ``ok``."""
        now = self._now(now)
        self._expire(now)
        slices = list(self._slices)
        suffix = [WindowTotals()] * (len(slices) + 1)  # suffix[k]: what remains once slices[:k] expired
        for k in range(len(slices) - 1, -1, -1):
            _, de, dg, di = slices[k]
            nxt = suffix[k + 1]
            suffix[k] = WindowTotals(nxt.energy_j + de, nxt.graded_j + dg, nxt.ideal_j + di)
        for k in range(len(slices) + 1):
            if ok(suffix[k]):
                return 0.0 if k == 0 else max(0.0, self._expires(slices[k - 1][0]) - now)
        raise ValueError("the condition does not hold for an empty window")
