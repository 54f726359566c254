"""``wattprint policy report --ledger L --policy P``: a ledger audited against an access policy.

Energy and requests per stratum, the efficiency classes they reached, what the policy would have
admitted, deprioritized or refused, and when budgets ran out (the replay:
:mod:`wattprint.profiler.policy.audit`). ``--json FILE`` also writes the audit as JSON (0600).
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("report", help="audit a ledger against a policy: energy, classes and decisions by stratum")
    r.add_argument("--ledger", required=True, help="the sidecar's ledger (JSON lines)")
    r.add_argument("--policy", required=True, help="policy YAML (configs/policy.yaml is the commented example)")
    r.add_argument("--json", metavar="FILE", help="also write the audit as JSON")
    r.add_argument("--limit", type=int, default=20, help="rows of the budget-exhaustion table (default 20)")
    r.add_argument("-q", "--quiet", action="store_true", help="print no tables")


def run(args: argparse.Namespace) -> int:
    from wattprint.errors import ConfigError
    from wattprint.profiler.policy.audit import audit, read_ledger_records
    from wattprint.profiler.policy.config import load_policy

    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    policy = load_policy(args.policy)
    contents = read_ledger_records(args.ledger)
    result = audit(contents.records, policy, max_episodes=max(args.limit, 100), torn_bytes=contents.torn_bytes)
    if args.json:
        from wattprint.files import atomic_write

        atomic_write(args.json, (json.dumps(audit_dict(result), indent=1) + "\n").encode(), mode=0o600)
    if not args.quiet:
        print_audit(result, policy, args.ledger, args.policy, limit=args.limit)
    return 0


def audit_dict(result) -> dict:
    return {"t0": result.t0, "t1": result.t1, "sources": list(result.sources), "torn_bytes": result.torn_bytes,
            "requests": result.requests, "energy_j": result.energy_j,
            "strata": {s: dataclasses.asdict(a) for s, a in result.strata.items()},
            "episodes": [dataclasses.asdict(e) for e in result.episodes]}


def _j(v: float) -> str:
    return f"{v:,.3f}" if v < 1000 else f"{v:,.0f}"


def _conditions(rule) -> str:
    parts = [f"priority {rule.priority}"]
    if rule.budget_j is not None:
        parts.append(f"{rule.budget_j:,.6g} J per {rule.budget_window_s:g} s")
    if rule.min_class is not None:
        parts.append(f"class >= {rule.min_class}")
    if rule.conditioned:
        parts.append(f"else {rule.on_breach}")
    return ", ".join(parts)


def print_audit(result, policy, ledger: str, policy_path: str, *, limit: int = 20, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from wattprint.exporters.report import source_note
    from wattprint.profiler.core.efficiency import bands
    from wattprint.profiler.policy.audit import NO_CLASS

    console = console or Console()
    if not console.is_terminal and console.width < 160:
        console.width = 160
    total = result.energy_j or 1.0
    t = Table(title=f"Energy and decisions by stratum ({ledger} against {policy_path})", header_style="bold")
    for name in ("stratum", "requests", "energy J", "share", "conditions", "admit", "observe", "deprioritize",
                 "reject", "refused J", "ran out"):
        t.add_column(name, justify="left" if name in ("stratum", "conditions") else "right")
    for s, a in result.strata.items():
        rule = policy.rule(s)
        if not a.requests and not rule.conditioned:
            continue
        d = a.decisions
        t.add_row(s, str(a.requests), _j(a.energy_j), f"{100 * a.energy_j / total:.1f} %", _conditions(rule),
                  str(d["admit"]), str(d["observe"]), str(d["deprioritize"]), str(d["reject"]), _j(a.refused_j),
                  f"{a.episodes}x" if a.episodes else "-")
    span = f"{result.t1 - result.t0:,.1f} s" if result.t0 is not None else "no timed records"
    notes = "; ".join(source_note(s) for s in result.sources) or "no source named"
    t.caption = (f"{result.requests} requests, {_j(result.energy_j)} J over {span}; energy: {notes}"
                 + (f"; a torn last line ({result.torn_bytes} bytes) skipped" if result.torn_bytes else ""))
    console.print(t)

    classes = [c for c, _ in bands()] + [NO_CLASS]
    c = Table(title="Efficiency classes by stratum (requests)", header_style="bold")
    c.add_column("stratum")
    for name in classes:
        c.add_column(name, justify="right")
    for s, a in result.strata.items():
        if a.requests:
            c.add_row(s, *(str(a.classes.get(name, 0)) for name in classes))
    console.print(c)

    if result.episodes:
        e = Table(title="When budgets ran out (seconds from the ledger's first request)", header_style="bold")
        for name in ("stratum", "from s", "until s", "for s", "observed", "deprioritized", "refused"):
            e.add_column(name, justify="left" if name == "stratum" else "right")
        for ep in result.episodes[:limit]:
            e.add_row(ep.stratum, f"{ep.start_s:,.1f}", f"{ep.end_s:,.1f}", f"{ep.end_s - ep.start_s:,.1f}",
                      str(ep.decisions["observe"]), str(ep.decisions["deprioritize"]), str(ep.decisions["reject"]))
        listed = sum(a.episodes for a in result.strata.values())
        if listed > min(limit, len(result.episodes)):
            e.caption = f"{min(limit, len(result.episodes))} of {listed} shown"
        console.print(e)
    else:
        console.print("No budget ran out.")
