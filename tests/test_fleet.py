"""`wattprint ledger compact`: a fleet's ledgers as one day-partitioned Parquet table, read by DuckDB
with the queries of docs/fleet.md (extracted from the page, so the page and the command cannot drift)."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from wattprint.cli import main
from wattprint.exporters.ledger import Ledger
from wattprint.profiler.core.results import RequestResult

duckdb = pytest.importorskip("duckdb", reason="duckdb is a test dependency (pip install duckdb)")

DOC = Path(__file__).resolve().parents[1] / "docs" / "fleet.md"
DAY_S = 86_400.0
NOW = time.time()


def _result(rid: str, energy_j: float, output_tokens: int, *, model: str, stratum: str | None,
            source: str = "nvml", status: str = "final") -> RequestResult:
    return RequestResult(id=rid, energy_j=energy_j, prefill_j=0.25 * energy_j, decode_j=0.75 * energy_j,
                         kv_j=0.1 * energy_j, kv_read_bytes=1e6, kv_write_bytes=1e5, prompt_tokens=100,
                         output_tokens=output_tokens, flops=1e12, stratum=stratum, source=source, model=model,
                         status=status, compute_j=0.4 * energy_j, weights_j=0.3 * energy_j,
                         static_j=0.2 * energy_j)


def _write_ledger(path: Path, seed: int, days_ago: tuple[int, ...], undated: int = 0) -> list[dict]:
    """A ledger written by the real Ledger, with the logged time of each line added; returns the lines."""
    rng = np.random.default_rng(seed)
    with Ledger(path) as ledger:
        for k in range(60):
            model = ("llama-8b", "qwen-7b")[k % 2]
            source = "simulated" if k % 15 == 7 else "nvml"
            status = "provisional" if k % 20 == 3 else "final"
            ledger.append(_result(f"r{seed}-{k}", float(rng.uniform(5, 500)), int(rng.integers(0, 400)),
                                  model=model, stratum=(None, "science", "critical")[k % 3], source=source,
                                  status=status))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for k, line in enumerate(lines):
        assert line["logged_unix_s"] > 0  # the ledger dates every line; spread them over days here
        if k >= len(lines) - undated:
            del line["logged_unix_s"]  # as a ledger written before lines were dated
            continue
        line["logged_unix_s"] = NOW - days_ago[k % len(days_ago)] * DAY_S + k
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


@pytest.fixture()
def fleet(tmp_path):
    a = _write_ledger(tmp_path / "a" / "ledger.jsonl", 1, (0, 1, 2), undated=4)
    b = _write_ledger(tmp_path / "b" / "ledger.jsonl", 2, (0, 3))
    with open(tmp_path / "a" / "ledger.jsonl", "a") as f:  # a corrupt line and a torn last one
        f.write('{"id": "x", "energy_j": "lots"}\nnot json\n{"id": "torn", "energy_')
    return tmp_path, a, b


def _day(t: float | None, undated: str) -> str:
    return undated if t is None else time.strftime("%Y-%m-%d", time.gmtime(t))


def _compact(tmp_path, name: str, capsys, undated="2026-01-02") -> str:
    rc = main(["ledger", "compact", str(tmp_path / name / "ledger.jsonl"), "--out", str(tmp_path / "ledger"),
               "--undated-date", undated])
    assert rc == 0
    return capsys.readouterr().out


def _sql_blocks() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4, "docs/fleet.md lost its DuckDB queries"
    return blocks


def test_compaction_layout_privacy_and_counts(fleet, capsys):
    tmp_path, a, b = fleet
    out = _compact(tmp_path, "a", capsys)
    assert "4 line(s) without logged_unix_s dated 2026-01-02" in out
    assert "skipped 1 line(s): torn last line" in out and "skipped 1 line(s): malformed JSON" in out
    assert "skipped 1 line(s): not a request record" in out
    _compact(tmp_path, "b", capsys)
    root = tmp_path / "ledger"
    days = {_day(x.get("logged_unix_s"), "2026-01-02") for x in a + b}
    assert {p.name for p in root.iterdir()} == {f"date={d}" for d in days}
    files = sorted(root.glob("date=*/*.parquet"))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    con = duckdb.connect()
    n = con.execute(f"SELECT count(*) FROM read_parquet('{root}/*/*.parquet', hive_partitioning = true)").fetchone()[0]
    assert n == len(a) + len(b)
    before = {f.name for f in files}
    _compact(tmp_path, "a", capsys)  # again: its files are replaced, nothing is added twice
    assert {f.name for f in root.glob("date=*/*.parquet")} == before
    assert con.execute(f"SELECT count(*) FROM read_parquet('{root}/*/*.parquet')").fetchone()[0] == n


def test_every_documented_query_runs_and_adds_up(fleet, capsys, monkeypatch):
    tmp_path, a, b = fleet
    _compact(tmp_path, "a", capsys)
    _compact(tmp_path, "b", capsys)
    monkeypatch.chdir(tmp_path)  # the page's view reads ledger/*/*.parquet
    con = duckdb.connect()
    results = {}
    for sql in _sql_blocks():
        title = sql.strip().splitlines()[0].lstrip("- ").strip()
        cur = con.execute(sql)
        results[title] = (cur.fetchall(), [d[0] for d in cur.description]) if cur.description else ([], [])
    lines = a + b
    measured = [x for x in lines if x["source"] in ("nvml", "rapl")]

    rows, cols = results["energy by model, stratum and day (measured energy only)"]
    got = {(str(r[0]), r[1], r[2]): r[cols.index("energy_kwh")] for r in rows}
    want: dict = {}
    for x in measured:
        key = (_day(x.get("logged_unix_s"), "2026-01-02"), x["model"], x["stratum"] or "(none)")
        want[key] = want.get(key, 0.0) + x["energy_j"] / 3.6e6
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    assert sum(r[cols.index("requests")] for r in rows) == sum(x["status"] == "final" for x in measured)

    rows, cols = results["J per output token percentiles by model (final requests, measured energy)"]
    for r in rows:
        v = [x["energy_j"] / x["output_tokens"] for x in measured
             if x["model"] == r[0] and x["status"] == "final" and x["output_tokens"] > 0]
        assert r[cols.index("requests")] == len(v)
        for q, name in ((50, "p50_j_per_token"), (90, "p90_j_per_token"), (99, "p99_j_per_token")):
            assert r[cols.index(name)] == pytest.approx(np.percentile(v, q), rel=1e-9)
    assert {r[0] for r in rows} == {"llama-8b", "qwen-7b"}

    rows, _ = results["energy by source: what is measured, and what is not"]
    assert {r[0]: r[1] for r in rows} == {"nvml": len(measured), "simulated": len(lines) - len(measured)}

    rows, cols = results["energy by efficiency class and model, last 7 days"]
    recent = [x for x in measured if x.get("logged_unix_s") is not None]
    assert sum(r[cols.index("requests")] for r in rows) == len(recent)  # the undated ones are from January


def test_bad_input_exits_2(tmp_path, capsys):
    rc = main(["ledger", "compact", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "l.jsonl").write_text("")
    rc = main(["ledger", "compact", str(tmp_path / "l.jsonl"), "--out", str(tmp_path / "out"),
               "--undated-date", "yesterday"])
    assert rc == 2 and "YYYY-MM-DD" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
