"""The request ledger: append-only lines, torn-line recovery, no duplicates across restarts."""

from __future__ import annotations

import json
import os

import pytest

from wattprint.errors import InputError
from wattprint.exporters.ledger import Ledger, read_ledger
from wattprint.profiler.core.results import RequestResult


def _result(rid: str, energy_j: float = 10.0, model: str | None = None) -> RequestResult:
    return RequestResult(id=rid, energy_j=energy_j, prefill_j=2.0, decode_j=energy_j - 2.0, kv_j=1.0,
                         kv_read_bytes=1e6, kv_write_bytes=1e5, prompt_tokens=10, output_tokens=5, flops=1e12,
                         stratum="science", source="", model=model)


def test_lines_hold_result_fields_model_and_source(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        assert ledger.append(_result("a"), model="llama", source="nvml")
        assert ledger.append(_result("b", model="given"), model="llama", source="nvml")
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    a, b = (json.loads(x) for x in lines[:2])
    assert a["id"] == "a" and a["model"] == "llama" and a["source"] == "nvml" and a["status"] == "final"
    assert a["energy_j"] == 10.0 and a["j_per_output_token"] == 2.0 and a["stratum"] == "science"
    assert b["model"] == "given"  # the result's own model wins
    assert os.stat(path).st_size == sum(len(x) + 1 for x in lines[:2])


def test_no_duplicates_on_restart(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        for rid in ("a", "b", "c"):
            ledger.append(_result(rid), model="m", source="nvml")
        assert not ledger.append(_result("a"), model="m", source="nvml")
        assert ledger.duplicates == 1
    with Ledger(path) as ledger:
        assert ledger.loaded_lines == 3 and "b" in ledger and len(ledger) == 3
        assert not ledger.append(_result("b"))
        assert ledger.append(_result("d"))
    assert [r["id"] for r in read_ledger(path)] == ["a", "b", "c", "d"]


def test_torn_last_line_is_truncated(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.append(_result("a"), model="m", source="nvml")
        ledger.append(_result("b"), model="m", source="nvml")
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "energy_j": 1')  # a crash mid-write
    assert [r["id"] for r in read_ledger(path)] == ["a", "b"]
    with Ledger(path) as ledger:
        assert ledger.truncated_bytes == len(b'{"id": "c", "energy_j": 1')
        assert "c" not in ledger and "a" in ledger
        assert path.read_bytes() == good
        assert ledger.append(_result("c"), model="m", source="nvml")  # c was never recorded: write it now
    assert [r["id"] for r in read_ledger(path)] == ["a", "b", "c"]
    assert path.read_bytes().endswith(b"\n")


def test_torn_line_without_any_newline(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"id": "x"')
    with Ledger(path) as ledger:
        assert ledger.truncated_bytes == 10 and len(ledger) == 0
        ledger.append(_result("y"))
    assert [r["id"] for r in read_ledger(path)] == ["y"]


def test_corrupt_middle_line_is_skipped_not_removed(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n\n{"no_id": 1}\n{"id": "b"}\n')
    with Ledger(path) as ledger:
        assert ledger.corrupt_lines == 2 and ledger.loaded_lines == 2 and ledger.truncated_bytes == 0
        assert "a" in ledger and "b" in ledger
    assert path.read_bytes().startswith(b'{"id": "a"}\nnot json\n')


def test_ids_are_bounded(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with Ledger(path, max_ids=3) as ledger:
        for i in range(10):
            ledger.append(_result(f"r{i}"))
        assert len(ledger) == 3 and "r9" in ledger and "r0" not in ledger
    with Ledger(path, max_ids=3) as ledger:
        assert ledger.loaded_lines == 10 and len(ledger) == 3 and "r7" in ledger


def test_large_file_scan_across_chunks(tmp_path):
    path = tmp_path / "ledger.jsonl"
    lines = [json.dumps({"id": f"req-{i:06d}", "pad": "x" * 200}).encode() + b"\n" for i in range(6000)]
    path.write_bytes(b"".join(lines) + b'{"id": "torn"')  # > 1 MiB: several scan chunks
    with Ledger(path) as ledger:
        assert ledger.loaded_lines == 6000 and "req-005999" in ledger and "req-000000" in ledger
        assert ledger.truncated_bytes == len(b'{"id": "torn"')


def test_append_after_close_and_unwritable_path(tmp_path):
    ledger = Ledger(tmp_path / "sub" / "ledger.jsonl", fsync_interval_s=0.0)
    ledger.append(_result("a"))
    ledger.close()
    ledger.close()
    with pytest.raises(InputError):
        ledger.append(_result("b"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError):
        Ledger(tmp_path / "dir")


def test_provisional_lines_do_not_block_the_final_part(tmp_path):
    path = tmp_path / "ledger.jsonl"
    cut = _result("r")
    cut.status = "provisional"
    with Ledger(path) as ledger:
        assert ledger.append(cut, model="m", source="nvml")  # shutdown mid-request
        assert "r" not in ledger
    with Ledger(path) as ledger:
        assert "r" not in ledger and ledger.loaded_lines == 1
        assert ledger.append(_result("r", energy_j=4.0), model="m", source="nvml")  # the rest, after restart
        assert not ledger.append(_result("r", energy_j=4.0))
    rows = read_ledger(path)
    assert [(r["id"], r["status"]) for r in rows] == [("r", "provisional"), ("r", "final")]
    assert sum(r["energy_j"] for r in rows) == 14.0
