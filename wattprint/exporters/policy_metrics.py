"""The access policy's metric families, for the sidecar's ``/metrics``:

* ``wattprint_policy_decisions_total{stratum,decision}``: requests by stratum and decision
  (``admit``, ``observe``, ``deprioritize``, ``reject``);
* ``wattprint_policy_budget_remaining_joules{stratum}``: joules left in a stratum's rolling budget
  (the smallest any server process reports);
* ``wattprint_policy_budget_joules{stratum}``: the budget itself, per window;
* ``wattprint_policy_stratum_claims_refused_total{reason}``: stratum claims not honoured (``unknown``
  value, or ``not_allowed`` for the client's key).

The decisions are made in the server's processes (:mod:`wattprint.exporters.policy_gate`), which write
their counts into a private directory; :class:`PolicyCollector` reads it at each scrape. Every file is
validated (known strata, decisions and reasons, finite non-negative numbers, bounded size and count); a
bad one is skipped and counted once in ``wattprint_policy_stats_files_rejected_total``. Counts of processes
that ended stay counted (counters never go back); budgets come only from files written in the last
``fresh_s`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wattprint.profiler.policy.config import all_strata
from wattprint.profiler.policy.decide import DECISIONS

REFUSALS = ("unknown", "not_allowed")
MAX_FILES = 64
MAX_FILE_BYTES = 64 << 10


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _joules(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def parse_stats(raw: bytes) -> dict | None:
    """A stats file's content, validated (None when it is not one)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    strata = set(all_strata())
    if not isinstance(data, dict):
        return None
    decisions, refused = data.get("decisions", {}), data.get("refused_claims", {})
    remaining, budget = data.get("remaining_j", {}), data.get("budget_j", {})
    if not all(isinstance(x, dict) for x in (decisions, refused, remaining, budget)):
        return None
    for s, counts in decisions.items():
        if s not in strata or not isinstance(counts, dict) or \
                not all(d in DECISIONS and _count(n) for d, n in counts.items()):
            return None
    if not all(r in REFUSALS and _count(n) for r, n in refused.items()):
        return None
    for gauge in (remaining, budget):
        if not all(s in strata and _joules(v) for s, v in gauge.items()):
            return None
    return {"decisions": decisions, "refused_claims": refused, "remaining_j": remaining, "budget_j": budget}


class PolicyCollector:
    """A prometheus_client collector over a policy stats directory (``None``: the families, empty)."""

    def __init__(self, stats_dir: str | None, fresh_s: float = 30.0):
        self.stats_dir, self.fresh_s = stats_dir, fresh_s
        self.rejected = 0
        self._seen_bad: set[tuple[str, int]] = set()  # (name, mtime_ns) of bad files already counted

    def _files(self) -> list[tuple[dict, bool]]:
        if not self.stats_dir:
            return []
        try:
            names = sorted(n for n in os.listdir(self.stats_dir) if n.startswith("policy-") and n.endswith(".json"))
        except OSError:
            return []
        out, now = [], time.time()
        for name in names[:MAX_FILES]:
            try:
                fd = os.open(os.path.join(self.stats_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    st = os.fstat(fd)
                    raw = os.read(fd, MAX_FILE_BYTES + 1)
                finally:
                    os.close(fd)
            except OSError:
                continue
            stats = parse_stats(raw) if len(raw) <= MAX_FILE_BYTES else None
            if stats is None:
                if (name, st.st_mtime_ns) not in self._seen_bad:
                    self.rejected += 1
                    if len(self._seen_bad) >= 4 * MAX_FILES:
                        self._seen_bad.clear()
                    self._seen_bad.add((name, st.st_mtime_ns))
                continue
            out.append((stats, now - st.st_mtime <= self.fresh_s))
        return out

    def collect(self):
        decisions = CounterMetricFamily("wattprint_policy_decisions", "Requests by stratum and access-policy "
                                        "decision (admit, observe, deprioritize, reject)", labels=["stratum", "decision"])
        remaining = GaugeMetricFamily("wattprint_policy_budget_remaining_joules",
                                      "Joules left in the stratum's rolling energy budget", labels=["stratum"])
        budget = GaugeMetricFamily("wattprint_policy_budget_joules", "The stratum's rolling energy budget per "
                                   "window", labels=["stratum"])
        refused = CounterMetricFamily("wattprint_policy_stratum_claims_refused", "Stratum claims not honoured, "
                                      "by reason (unknown value, not allowed for the client's key)", labels=["reason"])
        rejected = CounterMetricFamily("wattprint_policy_stats_files_rejected", "Policy stats files that did not "
                                       "validate (skipped)")
        files = self._files()
        sums = {(s, d): 0 for s in all_strata() for d in DECISIONS} if files else {}
        refusals = dict.fromkeys(REFUSALS, 0) if files else {}
        left: dict[str, float] = {}
        budgets: dict[str, float] = {}
        for stats, fresh in files:
            for s, counts in stats["decisions"].items():
                for d, n in counts.items():
                    sums[(s, d)] += n
            for r, n in stats["refused_claims"].items():
                refusals[r] += n
            if fresh:
                for s, v in stats["remaining_j"].items():
                    left[s] = min(left.get(s, math.inf), float(v))
                budgets.update({s: float(v) for s, v in stats["budget_j"].items()})
        for (s, d), n in sums.items():
            decisions.add_metric([s, d], n)
        for s, v in left.items():
            remaining.add_metric([s], v)
        for s, v in budgets.items():
            budget.add_metric([s], v)
        for r, n in refusals.items():
            refused.add_metric([r], n)
        rejected.add_metric([], self.rejected)
        yield from (decisions, remaining, budget, refused, rejected)
