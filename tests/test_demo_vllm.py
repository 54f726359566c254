"""``wattprint demo`` end to end, as ``make demo`` runs it: the real vLLM CPU engine, the sidecar, the
middleware with the demo's access policy, the real OpenAI client.

The demo must exit 0 with every served request final, say loudly that its joules are simulated, show the
policy at work (the agentic stratum's budget runs out and a later agentic request gets 429 with
Retry-After while the other strata are served; the decisions in ``metrics.prom``), conserve energy, and
leave private files.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps narrower tables; the assertions read whole lines
    proc = subprocess.run([sys.executable, "-m", "wattprint.cli", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    return out, proc


def test_demo_runs_and_conserves(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "SIMULATED ENERGY" in proc.stdout and "NOT measurements" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"] == "simulated" and summary["meter"] == "simulated"
    assert summary["conservation_error"] <= 1e-9
    assert summary["requests_final"] == summary["requests_sent"] >= 10
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == summary["requests_sent"]
    assert all(r["energy_j"] > 0 and r["status"] == "final" for r in records)
    assert abs(sum(r["energy_j"] for r in records) - summary["attributed_j"]) <= 1e-9 * summary["measured_j"]


def test_demo_shows_the_policy_at_work(demo):
    out, proc = demo
    assert proc.returncode == 0, proc.stderr[-4000:]
    refused = re.findall(r"refused by the policy \(429, Retry-After (\d+) s\): (agentic-\S+)", proc.stdout)
    assert refused, proc.stdout[-6000:]
    assert all(int(after) > 0 for after, _ in refused)
    strata = {json.loads(line).get("stratum") for line in (out / "requests.jsonl").read_text().splitlines()}
    assert {"critical", "science", "productive", "agentic"} <= strata  # the others were served
    prom = (out / "metrics.prom").read_text()
    m = re.search(r'wattprint_policy_decisions_total\{decision="reject",stratum="agentic"\} (\S+)', prom)
    assert m and float(m.group(1)) == len(refused)
    assert "Energy and decisions by stratum" in proc.stdout and "Efficiency classes by stratum" in proc.stdout
    assert "When budgets ran out" in proc.stdout


def test_demo_files_are_private(demo):
    out, _ = demo
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("requests.jsonl", "summary.json", "metrics.prom", "ledger.jsonl", "report.html", "vllm-server.log"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
