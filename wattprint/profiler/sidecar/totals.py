"""Cumulative totals of the sidecar's attributors: summed (an engine's attributor ends, its model's totals
carry on) and placed on the meter's device indices (each attributor sees only its session's devices); and
a bounded history of them by settled time (:class:`TotalsHistory`), for the figures of a recent window."""

from __future__ import annotations

from collections import deque

import numpy as np

from wattprint.profiler.core.results import Totals


def _add_nested(x: dict, y: dict) -> dict:
    out = {k: dict(v) for k, v in x.items()}
    for k, v in y.items():
        d = out.setdefault(k, {})
        for kk, vv in v.items():
            d[kk] = d.get(kk, 0.0) + vv
    return out


def _add_flat(x: dict, y: dict) -> dict:
    out = dict(x)
    for k, v in y.items():
        out[k] = out.get(k, 0.0) + v
    return out


def add_totals(a: Totals, b: Totals) -> Totals:
    """Elementwise sum of two cumulative totals (``b``'s source and coefficients win)."""
    n = max(len(a.device_measured_j), len(b.device_measured_j))
    dev = [
        (a.device_measured_j[i] if i < len(a.device_measured_j) else 0.0)
        + (b.device_measured_j[i] if i < len(b.device_measured_j) else 0.0)
        for i in range(n)
    ]
    starts = [t for t in (a.t_start, b.t_start) if t is not None]
    ends = [t for t in (a.t_end, b.t_end) if t is not None]
    return Totals(
        measured_j=a.measured_j + b.measured_j,
        attributed_j=a.attributed_j + b.attributed_j,
        idle_j=a.idle_j + b.idle_j,
        source=b.source or a.source,
        t_start=min(starts) if starts else None,
        t_end=max(ends) if ends else None,
        prefill_j=a.prefill_j + b.prefill_j,
        decode_j=a.decode_j + b.decode_j,
        kv_j=a.kv_j + b.kv_j,
        requests=a.requests + b.requests,
        steps=a.steps + b.steps,
        device_measured_j=dev,
        coefficients=dict(b.coefficients or a.coefficients),
        energy_j_by_phase_stratum=_add_nested(a.energy_j_by_phase_stratum, b.energy_j_by_phase_stratum),
        kv_j_by_stratum=_add_flat(a.kv_j_by_stratum, b.kv_j_by_stratum),
        tokens_by_phase_stratum=_add_nested(a.tokens_by_phase_stratum, b.tokens_by_phase_stratum),
        kv_read_bytes=a.kv_read_bytes + b.kv_read_bytes,
        kv_write_bytes=a.kv_write_bytes + b.kv_write_bytes,
        extrapolated_j=a.extrapolated_j + b.extrapolated_j,
        compute_j=a.compute_j + b.compute_j,
        weights_j=a.weights_j + b.weights_j,
        static_j=a.static_j + b.static_j,
    )


def on_devices(t: Totals, devices: tuple[int, ...], n_devices: int) -> Totals:
    """``t`` with its per-device joules moved from the attributor's device order to the meter's indices."""
    if list(devices) == list(range(len(t.device_measured_j))) and len(devices) == n_devices:
        return t
    dev = [0.0] * max(n_devices, max(devices, default=-1) + 1)
    for i, d in enumerate(devices):
        if i < len(t.device_measured_j):
            dev[d] += t.device_measured_j[i]
    t.device_measured_j = dev
    return t


#: the figures :class:`TotalsHistory` keeps at each settlement
HISTORY_FIELDS = ("measured_j", "attributed_j", "idle_j", "extrapolated_j", "prefill_j", "decode_j", "kv_j",
                  "compute_j", "weights_j", "static_j", "requests", "steps")


class TotalsHistory:
    """A bounded, time-indexed history of settled totals: at each settlement, (settled-until time, the
    cumulative figures of :data:`HISTORY_FIELDS`). The oldest points go first once ``capacity`` are kept."""

    def __init__(self, capacity: int = 4096):
        self._t: deque[float] = deque(maxlen=capacity)
        self._v: deque[tuple[float, ...]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._t)

    @property
    def last_t_s(self) -> float | None:
        return self._t[-1] if self._t else None

    def note(self, t_s: float, totals: Totals, t_start_s: float | None = None) -> None:
        """Record the cumulative ``totals`` settled up to ``t_s`` (ignored unless ``t_s`` is later than the
        last point). The first point is preceded by a zero point at ``t_start_s`` (when totals began)."""
        if self._t and t_s <= self._t[-1]:
            return
        if not self._t and t_start_s is not None and t_start_s < t_s:
            self._t.append(t_start_s)
            self._v.append((0.0,) * len(HISTORY_FIELDS))
        self._t.append(t_s)
        self._v.append(tuple(float(getattr(totals, f)) for f in HISTORY_FIELDS))

    def point_at_or_before(self, t_s: float) -> float | None:
        """The time of the latest point not after ``t_s`` (None if there is none): a window that starts
        there is an exact difference of settled totals, with nothing interpolated."""
        best = None
        for t in self._t:
            if t > t_s:
                break
            best = t
        return best

    def window_from(self, t_s: float) -> tuple[dict | None, dict | None]:
        """(the totals settled from the last point not after ``t_s``, all those settled so far). Starting
        at a point, the window is an exact difference: no request's energy is split between its two
        sides. (None, None) when nothing was settled before that point (the window would be the whole
        run)."""
        t0 = self.point_at_or_before(t_s)
        if t0 is None:
            return None, None
        window, upto = self.since(t0), self.since(float("-inf"))
        if window is None or upto is None or upto["measured_j"] <= window["measured_j"]:
            return None, None
        return window, upto

    def since(self, t_s: float) -> dict[str, float] | None:
        """The latest totals minus those settled up to ``t_s``: the figures of ``[t_s, latest]``.

        The totals at ``t_s`` are interpolated linearly between the two points around it; before the
        first point they are 0 (nothing was settled then); after the latest, the difference is 0. When
        ``t_s`` is older than the oldest point still kept (the history is bounded), the difference is
        taken from that oldest point, and ``t_from_s`` says so. Returns the fields of
        :data:`HISTORY_FIELDS` plus ``t_from_s`` and ``t_to_s`` (the span covered); None before the first
        settlement."""
        if not self._t:
            return None
        t = np.fromiter(self._t, float, len(self._t))
        v = np.array(self._v)
        latest = v[-1]
        if t_s >= t[-1]:
            base, t_from = latest, float(t[-1])
        elif t_s < t[0]:
            truncated = len(self._t) == self._t.maxlen
            base = v[0] if truncated else np.zeros(len(HISTORY_FIELDS))
            t_from = float(t[0]) if truncated else t_s
        else:
            i = int(np.searchsorted(t, t_s, side="right")) - 1
            w = (t_s - t[i]) / (t[i + 1] - t[i]) if i + 1 < len(t) else 0.0
            base = v[i] + w * (v[min(i + 1, len(t) - 1)] - v[i])
            t_from = t_s
        out = {f: float(x) for f, x in zip(HISTORY_FIELDS, latest - base)}
        out["t_from_s"], out["t_to_s"] = t_from, float(t[-1])
        return out
