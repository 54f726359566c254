"""The admission decision: admit, or - past a stratum's budget or below its minimum class - observe,
deprioritize or reject, as the stratum's ``on_breach`` says.

* ``admit``: within its conditions, served at the stratum's ``priority``;
* ``observe``: over them, served as usual, flagged (``X-Wattprint-Policy: breach``) and counted;
* ``deprioritize``: served with ``priority + deprioritize_by`` (vLLM serves lower values first);
* ``reject``: refused before the engine sees it, with ``retry_after_s``: whole seconds until the
  stratum is back within its conditions if nothing more is charged to it (at least 1).

A budget is breached once the window holds ``budget_j`` or more; the class once the window's efficiency
(ideal over attributed energy of its graded requests) falls in a class worse than ``min_class``.
:class:`BudgetBook` keeps one rolling window per conditioned stratum (strata are a bounded set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wattprint.profiler.core.efficiency import bands, efficiency, efficiency_class
from wattprint.profiler.policy.budget import DEFAULT_BUCKETS, RollingWindow, WindowTotals
from wattprint.profiler.policy.config import PRIORITY_RANGE, Policy, StratumRule

DECISIONS = ("admit", "observe", "deprioritize", "reject")
SEVERITY = {d: i for i, d in enumerate(DECISIONS)}
REASONS = ("budget", "class")


@dataclass(frozen=True)
class StratumState:
    """A stratum's window at one instant. ``remaining_j`` is never negative (None: no budget)."""

    spent_j: float = 0.0
    remaining_j: float | None = None
    window_class: str | None = None
    reason: str | None = None  # why it is over its conditions: "budget" or "class"
    wait_s: float = 0.0  # until it is back within them, with nothing more charged


@dataclass(frozen=True)
class Decision:
    stratum: str
    decision: str  # admit | observe | deprioritize | reject
    priority: int
    reason: str | None = None
    retry_after_s: int | None = None  # reject only
    remaining_j: float | None = None

    @property
    def admitted(self) -> bool:
        return self.decision != "reject"


def class_rank(cls: str) -> int:
    """0 for the best class, growing toward the worst."""
    return [c for c, _ in bands()].index(cls)


def window_class(t: WindowTotals) -> str | None:
    return efficiency_class(efficiency(t.ideal_j, t.graded_j)) if t.graded_j > 0 else None


def breach(rule: StratumRule, t: WindowTotals) -> str | None:
    """Why a window is over the rule's conditions (None when it is not)."""
    if rule.budget_j is not None and t.energy_j >= rule.budget_j:
        return "budget"
    if rule.min_class is not None:
        cls = window_class(t)
        if cls is not None and class_rank(cls) > class_rank(rule.min_class):
            return "class"
    return None


def state_of(rule: StratumRule, window: RollingWindow | None, now: float) -> StratumState:
    if window is None:
        return StratumState()
    t = window.totals(now)
    reason = breach(rule, t)
    remaining = None if rule.budget_j is None else max(0.0, rule.budget_j - t.energy_j)
    wait = window.wait_s(now, lambda w: breach(rule, w) is None) if reason else 0.0
    return StratumState(t.energy_j, remaining, window_class(t), reason, wait)


def decide(rule: StratumRule, state: StratumState, deprioritize_by: int = 100) -> Decision:
    """The decision for one request of ``rule``'s stratum in ``state`` (pure)."""
    if state.reason is None:
        return Decision(rule.stratum, "admit", rule.priority, None, None, state.remaining_j)
    if rule.on_breach == "reject":
        retry = max(1, math.ceil(state.wait_s)) if math.isfinite(state.wait_s) else 2**31 - 1
        return Decision(rule.stratum, "reject", rule.priority, state.reason, retry, state.remaining_j)
    if rule.on_breach == "deprioritize":
        priority = min(PRIORITY_RANGE[1], rule.priority + deprioritize_by)
        return Decision(rule.stratum, "deprioritize", priority, state.reason, None, state.remaining_j)
    return Decision(rule.stratum, "observe", rule.priority, state.reason, None, state.remaining_j)


class BudgetBook:
    """One rolling window per stratum whose rule has a budget or a minimum class."""

    def __init__(self, policy: Policy, buckets: int = DEFAULT_BUCKETS):
        self.policy = policy
        self.windows = {s: RollingWindow(r.window_s, buckets) for s, r in policy.rules.items() if r.conditioned}

    def charge(self, stratum: str, t: float, energy_j: float, ideal_j: float | None = None) -> bool:
        """Charge a served request's energy to its stratum (False: unconditioned stratum, or refused)."""
        window = self.windows.get(self.policy.rule(stratum).stratum)
        return window.charge(t, energy_j, ideal_j) if window is not None else False

    def state(self, stratum: str, now: float) -> StratumState:
        rule = self.policy.rule(stratum)
        return state_of(rule, self.windows.get(rule.stratum), now)

    def decide(self, stratum: str, now: float) -> Decision:
        rule = self.policy.rule(stratum)
        return decide(rule, state_of(rule, self.windows.get(rule.stratum), now), self.policy.deprioritize_by)
