"""Request-energy histograms with request-id exemplars (the state behind the Prometheus histograms)."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.core import Exemplar

#: Upper bounds (joules) of the per-request energy histogram. Spans a short request on a small model
#: (tenths of a joule) to long generations on multi-GPU models (kJ); ML.ENERGY: 0.07-3.8 J/token.
REQUEST_ENERGY_BUCKETS_J = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                            1000.0, 2500.0, 5000.0, 10000.0)
#: Upper bounds (joules per output token): facts.md figures range 0.018 to 3.8 J/token.
ENERGY_PER_TOKEN_BUCKETS_J = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: OpenMetrics caps an exemplar's label set at 128 UTF-8 characters.
_EXEMPLAR_ID_MAX = 128 - len("request_id")


class HistogramState:
    """A cumulative histogram with the latest exemplar (request id) of each bucket. Not thread-safe:
    the owner serialises :meth:`observe` and :meth:`copy`."""

    __slots__ = ("bounds", "counts", "sum", "count", "exemplars")

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(sorted(float(b) for b in bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket (not cumulative); last is +Inf
        self.sum = 0.0
        self.count = 0
        self.exemplars: list[tuple[str, float, float | None] | None] = [None] * (len(self.bounds) + 1)

    def observe(self, value: float, exemplar_id: str | None = None, timestamp_s: float | None = None) -> None:
        if not math.isfinite(value):
            return
        i = bisect_left(self.bounds, value)  # first bound >= value: Prometheus buckets are `le`
        self.counts[i] += 1
        self.sum += value
        self.count += 1
        if exemplar_id is not None:
            self.exemplars[i] = (str(exemplar_id)[:_EXEMPLAR_ID_MAX], float(value), timestamp_s)

    def copy(self) -> HistogramState:
        h = HistogramState.__new__(HistogramState)
        h.bounds = self.bounds
        h.counts = list(self.counts)
        h.sum = self.sum
        h.count = self.count
        h.exemplars = list(self.exemplars)
        return h

    def buckets(self) -> list[tuple]:
        """``prometheus_client`` bucket tuples: (le, cumulative count[, Exemplar])."""
        out = []
        cum = 0
        for i, c in enumerate(self.counts):
            cum += c
            le = "+Inf" if i == len(self.bounds) else _fmt_le(self.bounds[i])
            ex = self.exemplars[i]
            if ex is None:
                out.append((le, cum))
            else:
                out.append((le, cum, Exemplar({"request_id": ex[0]}, ex[1], ex[2])))
        return out


def _fmt_le(v: float) -> str:
    return repr(float(v))
