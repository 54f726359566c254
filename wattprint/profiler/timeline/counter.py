"""The counter rule, written once: where a cumulative energy counter changed, when that value was
published, and how a counter that goes back (driver reload, wrap) is stitched.

A counter like NVML's total energy is republished about every 100 ms and reads the same in between. A
change seen between two polls was published somewhere between them: its publish time is estimated as
their midpoint (``"midpoint"``). Counters updated at every read (RAPL, the CPU-time estimate) were
published at the sample time itself (``"sample"``). A value lower than the previous one means the
counter restarted from zero: the energy since is the new value, and later values are offset so that
the stitched counter never goes back.

:func:`change_points` applies the rule to whole arrays (offline attribution, calibration);
:class:`CounterTrack` applies it one poll at a time (the timeline, online attribution). Both give the
same change points for the same polls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PUBLISH_MODES = ("midpoint", "sample")
#: sources whose counters change at every read: their publish time is the sample time
CONTINUOUS_SOURCES = ("rapl", "cputime-estimate")


def publish_mode(source: str) -> str:
    """The publish-time rule for a meter source (``replay:<source>`` follows ``<source>``)."""
    base = source.split(":", 1)[1] if source.startswith("replay:") else source
    return "sample" if base in CONTINUOUS_SOURCES else "midpoint"


def publish_times(t_prev_s, t_s, publish: str = "midpoint"):
    """The estimated publish time of a change first seen at poll ``t_s`` (the poll before it at
    ``t_prev_s``): their midpoint, or the sample time for counters updated at every read. Scalars or arrays."""
    return 0.5 * (t_prev_s + t_s) if publish == "midpoint" else t_s


def change_points(t_s, energy_j, publish: str = "midpoint") -> tuple[np.ndarray, np.ndarray, int]:
    """Estimated publish times and stitched cumulative values where a counter changed.

    Returns ``(times, values, resets)``.
    """
    if publish not in PUBLISH_MODES:
        raise ValueError(f"publish must be one of {PUBLISH_MODES}, got {publish!r}")
    e = np.asarray(energy_j, dtype=float)
    t = np.asarray(t_s, dtype=float)
    de = np.diff(e)
    resets = int((de < 0).sum())
    if resets:  # stitch: across a reset the counter restarted from zero
        de = np.where(de < 0, np.maximum(e[1:], 0.0), de)
        e = np.concatenate([e[:1], e[0] + np.cumsum(de)])
    idx = np.flatnonzero(de != 0) + 1
    times = publish_times(t[idx - 1], t[idx], publish)
    return times, e[idx], resets


def stitched_offset_j(last_raw_j: float, raw_j: float, offset_j: float) -> float:
    """The offset to add to raw values from ``raw_j`` on: unchanged unless the counter went back, when
    it restarted from zero and everything it had counted (``last_raw_j`` plus the old offset) is kept."""
    if raw_j >= last_raw_j:
        return offset_j
    return last_raw_j + offset_j - min(raw_j, 0.0)


@dataclass(frozen=True)
class ChangePoint:
    """The first poll showing a new (stitched) counter value, the poll before it, and the estimated
    publish time."""

    t_prev_s: float
    t_s: float
    energy_j: float
    prev_energy_j: float
    t_pub_s: float

    @property
    def t_mid_s(self) -> float:
        """Midpoint between the last poll with the old value and this one."""
        return 0.5 * (self.t_prev_s + self.t_s)


class CounterTrack:
    """:func:`change_points`, one poll at a time (one device)."""

    __slots__ = ("publish", "resets", "_last_t", "_last_raw", "_offset")

    def __init__(self, publish: str = "midpoint"):
        if publish not in PUBLISH_MODES:
            raise ValueError(f"publish must be one of {PUBLISH_MODES}, got {publish!r}")
        self.publish = publish
        self.resets = 0
        self._last_t: float | None = None
        self._last_raw: float | None = None
        self._offset = 0.0

    @property
    def value_j(self) -> float | None:
        """The stitched value of the last poll."""
        return None if self._last_raw is None else self._last_raw + self._offset

    def feed(self, t_s: float, raw_j: float) -> ChangePoint | None:
        """Take one poll; return the change point it shows, if the value changed."""
        last_t, last_raw = self._last_t, self._last_raw
        self._last_t, self._last_raw = t_s, raw_j
        if last_raw is None or raw_j == last_raw:
            return None
        prev = last_raw + self._offset
        if raw_j < last_raw:  # the counter restarted from zero
            self.resets += 1
            self._offset = stitched_offset_j(last_raw, raw_j, self._offset)
        value = raw_j + self._offset
        t_pub = publish_times(last_t, t_s, self.publish)
        return ChangePoint(last_t, t_s, value, prev, t_pub)
