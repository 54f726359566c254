"""The access policy inside the HTTP middleware: which stratum a request gets, whether it is admitted,
at which priority, and the joules its answer charges to its stratum's rolling budget.

``wattprint serve --policy FILE`` installs it through the server's environment:

* ``WATTPRINT_POLICY``: the policy file (:mod:`wattprint.profiler.policy.config`);
* ``WATTPRINT_PRIORITY=1``: the server runs ``--scheduling-policy priority``, so the stratum's priority
  is written into the request body's ``priority`` (a client's own value is replaced); otherwise the body's
  priority is left alone (vLLM refuses priorities without priority scheduling);
* ``WATTPRINT_POLICY_STATS_DIR``: a private directory where the decision counts and the budgets left are
  written once a second (``policy-<pid>-<random>.json``, 0600), for the sidecar's ``/metrics``
  (:mod:`wattprint.exporters.policy_metrics`).

Budgets are charged with the figure each answer carries (provisional at answer time); an answer without
one (sidecar unavailable) charges nothing. Each server process keeps its own budgets.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass

from wattprint.profiler.policy.config import Policy, load_policy
from wattprint.profiler.policy.decide import DECISIONS, BudgetBook, Decision
from wattprint.profiler.policy.keys import Assignment, bearer_token

log = logging.getLogger(__name__)

ENV_POLICY = "WATTPRINT_POLICY"
ENV_PRIORITY = "WATTPRINT_PRIORITY"
ENV_STATS_DIR = "WATTPRINT_POLICY_STATS_DIR"
HEADER_POLICY = b"x-wattprint-policy"
HEADER_STRATUM_OUT = b"x-wattprint-stratum"
FLAGS = {"observe": b"breach", "deprioritize": b"deprioritized", "reject": b"rejected"}
REFUSALS = ("unknown", "not_allowed")
STATS_PERIOD_S = 1.0


@dataclass(frozen=True)
class Verdict:
    assignment: Assignment
    decision: Decision

    @property
    def stratum(self) -> str:
        return self.assignment.stratum

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [(HEADER_STRATUM_OUT, self.stratum.encode())]
        flag = FLAGS.get(self.decision.decision)
        if flag is not None:
            out.append((HEADER_POLICY, flag))
        return out


class PolicyGate:
    def __init__(self, policy: Policy, *, priority: bool = False, stats_dir: str | None = None,
                 clock=time.monotonic):
        self.policy, self.priority, self.clock = policy, priority, clock
        self.book = BudgetBook(policy)
        self.lock = threading.Lock()  # the book and the counts: the event loop and the stats writer
        self.decisions = {s: dict.fromkeys(DECISIONS, 0) for s in policy.strata}
        self.refusals = dict.fromkeys(REFUSALS, 0)
        self._stats_path = None
        self._stop = threading.Event()
        if stats_dir:
            self._stats_path = os.path.join(stats_dir, f"policy-{os.getpid()}-{secrets.token_hex(4)}.json")
            threading.Thread(target=self._stats_loop, name="wattprint-policy-stats", daemon=True).start()

    @classmethod
    def from_env(cls, environ=os.environ) -> PolicyGate | None:
        path = environ.get(ENV_POLICY)
        if not path:
            return None
        return cls(load_policy(path), priority=environ.get(ENV_PRIORITY) == "1",
                   stats_dir=environ.get(ENV_STATS_DIR) or None)

    # ------------------------------------------------------------------------------------ request
    def admit(self, authorization: bytes | None, claim: bytes | str | None) -> Verdict:
        """The stratum and decision for a request (counted)."""
        assignment = self.policy.keys.assign(bearer_token(authorization), claim)
        with self.lock:
            decision = self.book.decide(assignment.stratum, self.clock())
            self.decisions[assignment.stratum][decision.decision] += 1
            if assignment.refused is not None:
                self.refusals[assignment.refused] += 1
        return Verdict(assignment, decision)

    def rewrite(self, data: dict, verdict: Verdict) -> None:
        """Write the assigned stratum (and, with priority scheduling, the priority) into the body."""
        xargs = data.get("vllm_xargs")
        data["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), "stratum": verdict.stratum}
        if self.priority:
            data["priority"] = verdict.decision.priority

    def charge(self, stratum: str, energy: dict, ideal_j=None) -> None:
        """Charge an answer's figure (``usage.energy``; ``ideal_j`` from its record, for ``min_class``)."""
        e = energy.get("energy_j")
        if energy.get("status") == "unavailable" or e is None:
            return
        ok = isinstance(ideal_j, (int, float)) and not isinstance(ideal_j, bool) and math.isfinite(ideal_j)
        with self.lock:
            self.book.charge(stratum, self.clock(), e, ideal_j if ok and ideal_j >= 0 else None)

    @staticmethod
    def rejection(verdict: Verdict) -> tuple[dict, dict]:
        """The 429 answer (OpenAI's error shape) and its headers, sent before the engine sees the request."""
        d = verdict.decision
        body = json.dumps({"error": {
            "message": f"stratum {d.stratum!r} is over its {d.reason} condition; retry after {d.retry_after_s} s",
            "type": "wattprint_policy", "code": 429, "param": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(d.retry_after_s).encode()), *verdict.headers()]
        return ({"type": "http.response.start", "status": 429, "headers": headers},
                {"type": "http.response.body", "body": body, "more_body": False})

    # -------------------------------------------------------------------------------------- stats
    def stats(self) -> dict:
        with self.lock:
            now = self.clock()
            remaining = {s: self.book.state(s, now).remaining_j for s in self.book.windows}
            return {"pid": os.getpid(), "decisions": {s: dict(c) for s, c in self.decisions.items()},
                    "refused_claims": dict(self.refusals),
                    "remaining_j": {s: v for s, v in remaining.items() if v is not None},
                    "budget_j": {s: r.budget_j for s, r in self.policy.rules.items() if r.budget_j is not None}}

    def write_stats(self) -> None:
        if self._stats_path is None:
            return
        from wattprint.files import atomic_write

        atomic_write(self._stats_path, json.dumps(self.stats()).encode(), mode=0o600)

    def _stats_loop(self) -> None:
        while not self._stop.wait(STATS_PERIOD_S):
            try:
                self.write_stats()
            except Exception:  # noqa: BLE001 - a full disk must not stop the server; the next try may work
                log.warning("wattprint policy: could not write the decision counts", exc_info=True)

    def close(self) -> None:
        self._stop.set()
