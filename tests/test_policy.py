"""Access conditions per stratum (issue 10): policy files, API keys -> strata, rolling budgets, the
admission decision (with hypothesis property tests), and ``wattprint policy report`` on a synthetic ledger."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattprint import cli
from wattprint.errors import ConfigError, InputError
from wattprint.exporters.ledger import result_line
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.policy.audit import audit, read_ledger_records
from wattprint.profiler.policy.budget import RollingWindow
from wattprint.profiler.policy.config import load_policy, parse_policy
from wattprint.profiler.policy.decide import SEVERITY, BudgetBook, StratumState, decide
from wattprint.profiler.policy.keys import Assignment, bearer_token

ROOT = Path(__file__).resolve().parents[1]

POLICY = """
claimable: [science, agentic, critical, productive]
strata:
  agentic: {priority: 3, budget_j: 100, budget_window_s: 60, on_breach: reject}
  science: {priority: 1, budget_j: 100, budget_window_s: 60, on_breach: deprioritize}
  productive: {priority: 2, min_class: B, budget_window_s: 60, on_breach: observe}
  critical: {priority: 0}
"""


# ------------------------------------------------------------------------------------------- config
def test_shipped_example_loads_and_maps_its_documented_keys():
    p = load_policy(ROOT / "configs" / "policy.yaml")
    assert p.rules["agentic"].on_breach == "reject" and p.rules["agentic"].min_class == "D"
    assert p.rules["critical"].budget_j is None and p.rule("no such stratum").stratum == "unclassified"
    assert p.keys.assign(b"hospital-triage-key", b"critical").stratum == "critical"
    assert p.keys.assign(b"lab-key", None).stratum == "science"
    # a client with no key cannot name itself critical; a key cannot reach beyond its strata
    assert p.keys.assign(None, b"critical").stratum == "unclassified"
    assert p.keys.assign(None, b"critical").refused == "not_allowed"
    assert p.keys.assign(b"lab-key", b"critical").stratum == "science"
    assert p.keys.assign(None, b"agentic").stratum == "agentic"


@pytest.mark.parametrize("text, line, fragment", [
    ("strata:\n  agentic:\n    on_breach: explode\n", 3, "on_breach must be one of"),
    ("strata:\n  frivolous: {priority: 1}\n", 2, "unknown stratum 'frivolous'"),
    ("strata:\n  science:\n    budget_j: 10\n", 3, "budget_j needs budget_window_s"),
    ("strata:\n  science:\n    min_class: Z\n    budget_window_s: 5\n", 3, "min_class must be one of"),
    ("strata:\n  science:\n    budget_j: -1\n    budget_window_s: 5\n", 3, "budget_j must be > 0"),
    ("strata:\n  science:\n    budget_j: .nan\n    budget_window_s: 5\n", 3, "finite number"),
    ("strata:\n  science:\n    priority: true\n", 3, "priority must be an integer"),
    ("strata:\n  science:\n    priority: 99999999999\n", 3, "priority must be within"),
    ("strata:\n  science:\n    budget: 5\n", 3, "unknown setting 'budget'"),
    ("\n\nbudgets: {}\n", 3, "unknown setting 'budgets'"),
    ("version: 2\n", 1, "unsupported policy version"),
    ("strata: [a, b\n", 2, "not valid YAML"),
    ("api_keys:\n  'sha256:abc': science\n", 2, "64 hex digits"),
    ("api_keys:\n  k1: [science, martian]\n", 2, "unknown stratum 'martian'"),
    ("api_keys:\n  k1: []\n", 2, "non-empty list"),
    ("api_keys:\n  k1: science\n  'sha256:" + hashlib.sha256(b"k1").hexdigest() + "': agentic\n", 3, "twice"),
    ("claimable: science\n", 1, "claimable must be a list"),
    ("default_stratum: vip\n", 1, "unknown stratum"),
    ("- a\n- b\n", 1, "a policy is a mapping"),
])
def test_bad_policies_name_file_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    assert fragment in str(err.value)
    assert err.value.path == str(path) and err.value.line == line


def test_unreadable_and_binary_policies(tmp_path):
    with pytest.raises(ConfigError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"strata: {}\n\xff\xfe\n")
    with pytest.raises(ConfigError) as err:
        load_policy(bad)
    assert err.value.line == 2


def test_claimable_defaults():
    p = parse_policy("strata: {}\n")  # no keys: the header is trusted
    assert p.keys.assign(None, b"critical").stratum == "critical"
    p = parse_policy("api_keys: {k: critical}\n")  # keys: only the default is free
    assert p.keys.assign(None, b"critical").stratum == "unclassified"
    assert p.keys.assign(b"k", None).stratum == "critical"


# --------------------------------------------------------------------------------------------- keys
def test_keys_are_kept_only_as_digests_and_claims_are_bounded():
    p = parse_policy("api_keys:\n  super-secret-key-123: [science]\n")
    seen = repr(vars(p.keys)) + repr(dict(p.keys._entries))
    assert "super-secret" not in seen and b"super-secret" not in seen.encode()
    a = p.keys.assign(b"super-secret-key-123", b"x" * 100_000)
    assert a.stratum == "science" and a.refused == "unknown" and a.keyed
    assert p.keys.assign(b"super-secret-key-123", b"  SCIENCE ") == Assignment("science", None, True)
    assert p.keys.assign(None, "\x00\ud800").refused == "unknown"
    assert p.keys.assign(b"k" * 10_000, b"science").keyed is False
    assert p.keys.assign(None, b"unclassified").refused is None


def test_bearer_token():
    assert bearer_token(b"Bearer abc") == b"abc" and bearer_token("bearer  abc ") == b"abc"
    assert bearer_token(b"Basic abc") is None and bearer_token(b"Bearer ") is None and bearer_token(None) is None
    assert bearer_token(b"Bearer " + b"x" * 5000) is None


def test_ten_thousand_keys_and_hostile_strata_keep_memory_bounded():
    keys = "\n".join(f"  key-{i}: [{('science', 'agentic', 'critical')[i % 3]}]" for i in range(10_000))
    p = parse_policy("api_keys:\n" + keys + "\n" + POLICY.replace("claimable: [science, agentic, critical, productive]\n", ""))
    assert len(p.keys) == 10_000 and p.keys.assign(b"key-9999", None).stratum == "science"
    book = BudgetBook(p)
    n_windows = len(book.windows)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(10_000):
        a = p.keys.assign(f"stranger-{i}".encode(), f"stratum-{i}-{'y' * (i % 200)}".encode())
        book.charge(a.stratum, float(i), 1.0, 0.5)
        book.decide(a.stratum, float(i))
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(book.windows) == n_windows and set(book.windows) <= set(p.strata)
    assert all(len(w) <= w.max_slices for w in book.windows.values())
    assert grown < 200_000, grown


# ------------------------------------------------------------------------------------------- budget
charge_lists = st.lists(st.tuples(st.floats(0, 500), st.floats(0, 80), st.one_of(st.none(), st.floats(0, 80))),
                        max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(charges=charge_lists, extra=st.lists(st.floats(0, 50), min_size=60, max_size=60),
       on_breach=st.sampled_from(["observe", "deprioritize", "reject"]), now_after=st.floats(0, 200))
def test_decisions_are_monotone_in_spend_and_remaining_never_negative(charges, extra, on_breach, now_after):
    p = parse_policy(f"strata:\n  science: {{budget_j: 100, budget_window_s: 60, min_class: C, on_breach: {on_breach}}}\n")
    a, b = BudgetBook(p, buckets=16), BudgetBook(p, buckets=16)
    charges = sorted(charges, key=lambda c: c[0])
    for (t, e, i), more in zip(charges, extra):
        a.charge("science", t, e, i)
        b.charge("science", t, e + more, i)  # b spends more for the same work
        for book in (a, b):
            s = book.state("science", t)
            assert s.remaining_j is not None and s.remaining_j >= 0 and s.spent_j >= 0
    now = (charges[-1][0] if charges else 0.0) + now_after
    da, db = a.decide("science", now), b.decide("science", now)
    sa, sb = a.state("science", now), b.state("science", now)
    assert SEVERITY[db.decision] >= SEVERITY[da.decision]
    assert sb.remaining_j <= sa.remaining_j + 1e-9 and sb.spent_j >= sa.spent_j - 1e-9
    assert sb.wait_s >= sa.wait_s - 1e-9
    if da.decision == "reject":
        assert db.retry_after_s >= da.retry_after_s >= 1 and isinstance(da.retry_after_s, int)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(charges=st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(0, 1e4)), max_size=200),
       window=st.floats(0.01, 1e5), buckets=st.integers(1, 100))
def test_rolling_window_is_bounded_and_counts_what_the_window_holds(charges, window, buckets):
    w = RollingWindow(window, buckets)
    latest = -math.inf
    for t, e in charges:
        assert w.charge(t, e)
        latest = max(latest, t)
        assert len(w) <= buckets + 1
    if not charges:
        return
    total = w.totals(latest).energy_j
    # everything charged within the last window counts; nothing older than window + one slice does
    recent, _, ancient = _split(charges, latest, window, window / buckets)
    assert total >= recent - 1e-6 * (1 + recent)
    assert total <= sum(e for _, e in charges) - ancient + 1e-6 * (1 + total)


def _split(charges, latest, window, width):
    clamped, last = [], -math.inf
    for t, e in charges:  # a charge earlier than the latest one counts at the latest one's time
        last = max(last, t)
        clamped.append((last, e))
    recent = sum(e for t, e in clamped if t > latest - window)
    ancient = sum(e for t, e in clamped if t <= latest - window - width)
    return recent, None, ancient


def test_refused_charges_change_nothing():
    w = RollingWindow(10.0)
    for bad in ((math.nan, 1.0), (1.0, -1.0), (1.0, math.inf), (math.inf, 1.0), (1.0, True)):
        assert not w.charge(*bad)
    assert not w.charge(1.0, 1.0, -5.0) and not w.charge(1.0, 1.0, math.nan)
    assert w.refused == 7 and len(w) == 0 and w.totals(1.0).energy_j == 0.0
    with pytest.raises(ValueError):
        RollingWindow(0.0)


def test_retry_after_is_when_the_stratum_is_served_again():
    p = parse_policy(POLICY)
    book = BudgetBook(p)
    for t in range(4):
        book.charge("agentic", 100.0 + t, 30.0)
    d = book.decide("agentic", 104.0)
    assert d.decision == "reject" and d.reason == "budget" and d.remaining_j == 0.0
    # the stratum concerned only: the others are still served
    assert book.decide("science", 104.0).decision == "admit" and book.decide("critical", 104.0).decision == "admit"
    assert 56 <= d.retry_after_s <= 58
    assert book.decide("agentic", 104.0 + d.retry_after_s - 2).decision == "reject"
    assert book.decide("agentic", 104.0 + d.retry_after_s).decision == "admit"


def test_decide_by_on_breach_and_class():
    p = parse_policy(POLICY)
    rule = p.rules["science"]
    assert decide(rule, StratumState(150.0, 0.0, None, "budget", 3.2), 100).priority == 101
    assert decide(p.rules["agentic"], StratumState(reason="budget", wait_s=0.1)).retry_after_s == 1
    book = BudgetBook(p)
    book.charge("productive", 1.0, 100.0, 1.0)  # efficiency 0.01: class G, below B
    d = book.decide("productive", 1.0)
    assert d.decision == "observe" and d.reason == "class" and d.admitted
    book.charge("productive", 2.0, 0.0, 1000.0)  # the window's efficiency recovers: admitted again
    assert book.decide("productive", 2.0).decision == "admit"
    assert not book.charge("critical", 1.0, 1e9)  # no conditions: nothing kept
    assert book.decide("critical", 1.0).decision == "admit" and "critical" not in book.windows


# -------------------------------------------------------------------------------------------- audit
def _line(rid, stratum, t0, energy=30.0, ideal=None, source="simulated") -> bytes:
    r = RequestResult(id=rid, energy_j=energy, prefill_j=energy / 3, decode_j=2 * energy / 3, kv_j=1.0,
                      kv_read_bytes=0.0, kv_write_bytes=0.0, prompt_tokens=10, output_tokens=5, flops=1e9,
                      stratum=stratum, source=source, t_start=t0, t_end=t0 + 0.5, ideal_j=ideal)
    return result_line(r)


def _synthetic_ledger(path: Path) -> Path:
    lines = []
    for i in range(10):
        lines.append(_line(f"a{i}", "agentic", 1000.0 + i))
        lines.append(_line(f"s{i}", "science", 1000.2 + i))
    for i in range(5):
        lines.append(_line(f"c{i}", "critical", 1000.1 + 2 * i, energy=50.0, ideal=15.0))
    lines.append(_line("u", "x" * 1000, 1001.0, energy=1.0))
    path.write_bytes(b"".join(lines))
    return path


def test_audit_replays_the_policy(tmp_path):
    ledger = _synthetic_ledger(tmp_path / "ledger.jsonl")
    res = audit(read_ledger_records(ledger).records, parse_policy(POLICY))
    ag, sc, cr = res.strata["agentic"], res.strata["science"], res.strata["critical"]
    # agentic: 30 J each; the 4th charge (t = 3.5 s) exhausts 100 J; the 6 later requests are refused
    assert ag.requests == 10 and ag.energy_j == 300.0
    assert ag.decisions == {"admit": 4, "observe": 0, "deprioritize": 0, "reject": 6}
    assert ag.refused_j == 180.0 and ag.episodes == 1 and ag.reasons == {"budget": 6}
    # science: the same spend, deprioritized instead; as nothing is refused, it keeps spending
    assert sc.decisions == {"admit": 4, "observe": 0, "deprioritize": 6, "reject": 0} and sc.refused_j == 0.0
    assert cr.decisions["admit"] == 5 and cr.classes == {"B": 5}
    assert res.strata["unclassified"].requests == 1  # a huge stratum value: normalised, nothing raw kept
    (ep_a,) = [e for e in res.episodes if e.stratum == "agentic"]
    assert ep_a.start_s == pytest.approx(3.5) and 60.5 < ep_a.end_s < 61.5 and ep_a.decisions["reject"] == 6
    (ep_s,) = [e for e in res.episodes if e.stratum == "science"]
    assert ep_s.start_s == pytest.approx(3.7) and 66 < ep_s.end_s < 68 and ep_s.decisions["deprioritize"] == 6
    assert res.sources == ("simulated",) and res.t0 == 1000.0


def _cli(monkeypatch, *argv) -> int:
    monkeypatch.setitem(cli.COMMANDS, "policy", ("policy", "audit a ledger against an access policy"))
    return cli.main(list(argv))


def test_policy_report_command(tmp_path, monkeypatch, capsys):
    ledger = _synthetic_ledger(tmp_path / "ledger.jsonl")
    with open(ledger, "ab") as f:
        f.write(b'{"id": "torn", "energy_j": 1')  # a write cut short: skipped, counted
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    out = tmp_path / "audit.json"
    assert _cli(monkeypatch, "policy", "report", "--ledger", str(ledger), "--policy", str(policy),
                "--json", str(out)) == 0
    text = capsys.readouterr().out
    for needle in ("Energy and decisions by stratum", "Efficiency classes by stratum", "When budgets ran out",
                   "agentic", "SIMULATED", "torn last line"):
        assert needle in text, needle
    data = json.loads(out.read_text())
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert data["strata"]["agentic"]["decisions"]["reject"] == 6 and data["requests"] == 26
    assert data["torn_bytes"] == len(b'{"id": "torn", "energy_j": 1')


@pytest.mark.parametrize("line, fragment", [
    (b'{"id": "x", "energy_j": -3}', "energy_j must be a finite number >= 0"),
    (b'{"id": "x", "energy_j": 3, "t_start": 5, "t_end": 4}', "is before t_start"),
    (b'{"id": "x"}', "invalid record"),
    (b'not json', "malformed JSON"),
    (b'{"id": "x", "energy_j": 3, "efficiency_class": "Q"}', "unknown efficiency_class"),
    (b'{"id": "x", "energy_j": 3, "status": "maybe"}', "status must be one of"),
])
def test_bad_ledger_lines_exit_2_naming_file_and_line(tmp_path, monkeypatch, capsys, line, fragment):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_bytes(_line("ok", "science", 1.0) + b"\n" + line + b"\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    assert _cli(monkeypatch, "policy", "report", "--ledger", str(ledger), "--policy", str(policy)) == 2
    err = capsys.readouterr().err
    assert f"{ledger}:3: " in err and fragment in err
    with pytest.raises(InputError):
        read_ledger_records(ledger)


def test_bad_policy_exits_2(tmp_path, monkeypatch, capsys):
    ledger = _synthetic_ledger(tmp_path / "ledger.jsonl")
    policy = tmp_path / "policy.yaml"
    policy.write_text("strata:\n  agentic:\n    on_breach: maybe\n")
    assert _cli(monkeypatch, "policy", "report", "--ledger", str(ledger), "--policy", str(policy)) == 2
    assert f"{policy}:3: on_breach" in capsys.readouterr().err
