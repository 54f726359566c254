"""A ledger replayed against a policy: what the policy would have admitted, deprioritized or refused,
and when budgets ran out.

Each ledger line is a request that arrives at its ``t_start`` and, when admitted, is charged to its
stratum at its ``t_end`` (the steps' clock; only differences matter). A refused request is not
charged: the replay is the world the policy would have made. Lines without times are counted by
stratum but take no part in the replay. A request split over a sidecar restart is several lines
(``status: provisional`` then the rest) and is replayed as several arrivals.

Reading is strict: a line that is not a request record is an :class:`~wattprint.errors.InputError`
naming ``FILE:LINE``; only a torn last line (a write cut short, :mod:`wattprint.exporters.ledger`) is
skipped, and counted.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from wattprint.errors import InputError
from wattprint.profiler.core import records
from wattprint.profiler.core.efficiency import bands
from wattprint.profiler.core.strata import normalize
from wattprint.profiler.policy.config import Policy
from wattprint.profiler.policy.decide import DECISIONS, BudgetBook

STATUSES = ("final", "provisional", "incomplete")
NO_CLASS = "-"


class LedgerRecord(msgspec.Struct):
    """The fields of a ledger line the audit reads (the others are ignored)."""

    id: str
    energy_j: float
    stratum: str | None = None
    efficiency_class: str | None = None
    ideal_j: float | None = None
    t_start: float | None = None
    t_end: float | None = None
    status: str = "final"
    source: str | None = None


def _problem(r: LedgerRecord) -> str | None:
    if not (math.isfinite(r.energy_j) and r.energy_j >= 0):
        return f"energy_j must be a finite number >= 0, got {r.energy_j!r}"
    if r.ideal_j is not None and not (math.isfinite(r.ideal_j) and r.ideal_j >= 0):
        return f"ideal_j must be a finite number >= 0, got {r.ideal_j!r}"
    for name in ("t_start", "t_end"):
        v = getattr(r, name)
        if v is not None and not math.isfinite(v):
            return f"{name} must be finite, got {v!r}"
    if r.t_start is not None and r.t_end is not None and r.t_end < r.t_start:
        return f"t_end {r.t_end!r} is before t_start {r.t_start!r}"
    if r.efficiency_class is not None and r.efficiency_class not in dict(bands()):
        return f"unknown efficiency_class {r.efficiency_class[:16]!r}"
    if r.status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {r.status[:32]!r}"
    return None


@dataclass
class LedgerContents:
    records: list[LedgerRecord]
    torn_bytes: int = 0


def read_ledger_records(path: str | Path) -> LedgerContents:
    """Every line of a ledger, validated; raises InputError naming ``FILE:LINE``."""
    data = records.read_bytes(path)
    end = data.rfind(b"\n") + 1
    torn = len(data) - end
    data = data[:end]
    rows = records.decode_lines(data, msgspec.json.Decoder(LedgerRecord), str(path))
    for i, r in enumerate(rows):
        why = _problem(r)
        if why is not None:
            raise InputError(why, str(path), records._line_numbers(data)[i])
    return LedgerContents(rows, torn)


@dataclass
class Episode:
    """A stretch of time during which a stratum's budget was spent (seconds from the ledger's start)."""

    stratum: str
    start_s: float
    end_s: float
    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECISIONS, 0))


@dataclass
class StratumAudit:
    stratum: str
    requests: int = 0
    energy_j: float = 0.0
    untimed: int = 0
    classes: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECISIONS, 0))
    reasons: dict[str, int] = field(default_factory=dict)
    refused_j: float = 0.0  # energy of the requests the policy would have refused
    episodes: int = 0  # budget exhaustions (the first ``max_episodes`` are listed)


@dataclass
class Audit:
    strata: dict[str, StratumAudit]
    episodes: list[Episode]
    t0: float | None
    t1: float | None
    sources: tuple[str, ...]
    torn_bytes: int = 0

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.strata.values())

    @property
    def energy_j(self) -> float:
        return sum(s.energy_j for s in self.strata.values())


class _Replay:
    def __init__(self, policy: Policy, t0: float, max_episodes: int):
        self.policy, self.t0, self.max_episodes = policy, t0, max_episodes
        self.book = BudgetBook(policy)
        self.open: dict[str, tuple[Episode, float]] = {}  # stratum -> (episode, its end if nothing more is charged)
        self.episodes: list[Episode] = []
        self.per: dict[str, StratumAudit] = {}

    def _close_if_over(self, stratum: str, t: float) -> None:
        ep = self.open.get(stratum)
        if ep is not None and ep[1] <= t:
            del self.open[stratum]

    def charge(self, t: float, stratum: str, energy_j: float, ideal_j: float | None) -> None:
        self._close_if_over(stratum, t)
        self.book.charge(stratum, t, energy_j, ideal_j)
        rule = self.policy.rule(stratum)
        window = self.book.windows.get(rule.stratum)
        if rule.budget_j is None or window is None:
            return
        budget = rule.budget_j
        if window.totals(t).energy_j < budget:
            return
        end = t + window.wait_s(t, lambda w: w.energy_j < budget)
        ep = self.open.get(stratum)
        if ep is None:
            self.per[stratum].episodes += 1
            ep = (Episode(stratum, t - self.t0, end - self.t0), end)
            if len(self.episodes) < self.max_episodes:
                self.episodes.append(ep[0])
        ep[0].end_s = end - self.t0
        self.open[stratum] = (ep[0], end)

    def arrive(self, t: float, stratum: str, r: LedgerRecord) -> bool:
        self._close_if_over(stratum, t)
        d = self.book.decide(stratum, t)
        a = self.per[stratum]
        a.decisions[d.decision] += 1
        if d.reason is not None:
            a.reasons[d.reason] = a.reasons.get(d.reason, 0) + 1
        ep = self.open.get(stratum)
        if ep is not None:
            ep[0].decisions[d.decision] += 1
        if not d.admitted:
            a.refused_j += r.energy_j
        return d.admitted


def audit(rows: list[LedgerRecord], policy: Policy, *, max_episodes: int = 100, torn_bytes: int = 0) -> Audit:
    """Replay ``rows`` (in any order) against ``policy``."""
    timed = sorted((r for r in rows if r.t_start is not None), key=lambda r: r.t_start)
    t0 = timed[0].t_start if timed else None
    rp = _Replay(policy, t0 or 0.0, max_episodes)
    rp.per = {s: StratumAudit(s) for s in policy.strata}
    sources: dict[str, None] = {}
    for r in rows:
        a = rp.per[normalize(r.stratum)]
        a.requests += 1
        a.energy_j += r.energy_j
        a.untimed += r.t_start is None
        cls = r.efficiency_class or NO_CLASS
        a.classes[cls] = a.classes.get(cls, 0) + 1
        if r.source and len(sources) < 16:
            sources.setdefault(r.source[:64])
    pending: list[tuple[float, int, str, float, float | None]] = []
    t1 = t0
    for seq, r in enumerate(timed):
        while pending and pending[0][0] <= r.t_start:
            t, _, s, e, i = heapq.heappop(pending)
            rp.charge(t, s, e, i)
        stratum = normalize(r.stratum)
        end = r.t_end if r.t_end is not None else r.t_start
        t1 = max(t1, end)
        if rp.arrive(r.t_start, stratum, r):
            heapq.heappush(pending, (end, seq, stratum, r.energy_j, r.ideal_j))
    while pending:
        t, _, s, e, i = heapq.heappop(pending)
        rp.charge(t, s, e, i)
    return Audit(rp.per, rp.episodes, t0, t1, tuple(sources), torn_bytes)
