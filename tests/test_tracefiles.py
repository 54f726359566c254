"""Parquet trace files: the same records as JSON lines (steps, energy, requests, ledgers), identical
attribution, `wattprint convert` both ways, and bad files refused naming FILE:ROW."""

from __future__ import annotations

import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattprint.cli import main
from wattprint.errors import InputError
from wattprint.exporters.ledger import Ledger
from wattprint.profiler.attribution.offline import attribute
from wattprint.profiler.core import records
from wattprint.profiler.core import tracefiles as tf
from wattprint.profiler.core.columnar import table_bytes
from wattprint.profiler.core.records import EnergySample, RequestEntry, StepRecord, encode_line
from wattprint.profiler.core.resultfiles import read_ledger_any, read_requests_any
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate


@pytest.fixture(scope="module")
def trace(tmp_path_factory, llama8b, h100):
    d = tmp_path_factory.mktemp("trace")
    simulate(llama8b, h100, WorkloadSpec(requests=60, rate_rps=6, seed=11), n_devices=2).write(d)
    for name in ("steps", "energy"):
        assert main(["convert", str(d / f"{name}.jsonl"), str(d / f"{name}.parquet")]) == 0
    return d


def _same_trace(a: records.StepTrace, b: records.StepTrace) -> None:
    assert a.steps == b.steps
    ea, eb = a.entries, b.entries
    assert ea.reqs == eb.reqs and ea.slot_ids == eb.slot_ids
    for name in ("slot", "prefill", "decode", "context", "offsets"):
        x, y = getattr(ea, name), getattr(eb, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_steps_and_energy_read_the_same_from_parquet(trace):
    _same_trace(tf.load_steps_any(trace / "steps.parquet"), records.load_steps(trace / "steps.jsonl"))
    assert tf.read_energy_any(trace / "energy.parquet") == records.read_energy(trace / "energy.jsonl")
    assert tf.detect_kind(trace / "steps.parquet") == tf.detect_kind(trace / "steps.jsonl") == "steps"
    assert tf.detect_kind(trace / "energy.parquet") == tf.detect_kind(trace / "energy.jsonl") == "energy"
    assert stat.S_IMODE((trace / "steps.parquet").stat().st_mode) == 0o600


def test_chunked_parquet_reading_gives_the_same_steps(trace, tmp_path):
    whole = tf.load_steps_any(trace / "steps.parquet")
    groups = tmp_path / "groups.parquet"  # as other writers make them: many row groups
    pq.write_table(pq.read_table(trace / "steps.parquet"), groups, row_group_size=50)
    assert pq.ParquetFile(groups).num_row_groups > 3
    _same_trace(tf.load_steps_any(groups), whole)
    assert [s for steps, _ in tf.iter_steps_parquet(groups, batch_steps=64) for s in steps] == whole.steps
    chunks = list(tf.iter_steps_parquet(trace / "steps.parquet", batch_steps=37))
    assert len(chunks) > 3
    assert [s for steps, _ in chunks for s in steps] == whole.steps
    assert [r for _, e in chunks for r in e.reqs] == whole.entries.reqs


def test_attribution_is_identical_from_parquet(trace, llama8b, h100):
    a = attribute(tf.load_steps_any(trace / "steps.jsonl"), tf.read_energy_any(trace / "energy.jsonl"), llama8b,
                  h100, source="simulated")
    b = attribute(tf.load_steps_any(trace / "steps.parquet"), tf.read_energy_any(trace / "energy.parquet"),
                  llama8b, h100, source="simulated")
    assert a.requests == b.requests and a.totals == b.totals


def test_round_trip_back_to_json_lines_is_byte_identical(trace, tmp_path):
    for name in ("steps", "energy"):
        assert main(["convert", str(trace / f"{name}.parquet"), str(tmp_path / f"{name}.jsonl")]) == 0
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (trace / f"{name}.jsonl").read_bytes()


def test_requests_and_ledger_round_trip(trace, tmp_path, llama8b, h100):
    res = attribute(records.load_steps(trace / "steps.jsonl"), records.read_energy(trace / "energy.jsonl"),
                    llama8b, h100, source="simulated", model_name="llama")
    (tmp_path / "requests.jsonl").write_bytes(b"".join(map(encode_line, res.requests)))
    assert main(["convert", str(tmp_path / "requests.jsonl"), str(tmp_path / "r.parquet")]) == 0
    assert tf.detect_kind(tmp_path / "r.parquet") == "requests"
    assert read_requests_any(tmp_path / "r.parquet") == res.requests
    with Ledger(tmp_path / "ledger.jsonl") as ledger:
        for r in res.requests:
            ledger.append(r, model="llama", source="simulated")
    assert tf.detect_kind(tmp_path / "ledger.jsonl") == "ledger"
    assert main(["convert", str(tmp_path / "ledger.jsonl"), str(tmp_path / "ledger.parquet")]) == 0
    assert read_ledger_any(tmp_path / "ledger.parquet") == read_ledger_any(tmp_path / "ledger.jsonl")
    assert main(["convert", str(tmp_path / "ledger.parquet"), str(tmp_path / "back.jsonl")]) == 0
    assert (tmp_path / "back.jsonl").read_bytes() == (tmp_path / "ledger.jsonl").read_bytes()


entry = st.builds(RequestEntry, id=st.sampled_from(["a", "b", "c", "d", "é"]), prefill_tokens=st.integers(0, 9000),
                  decode_tokens=st.integers(0, 2), context_tokens=st.integers(0, 2**25),
                  stratum=st.none() | st.sampled_from(["science", "critical"]),
                  prompt_tokens=st.none() | st.integers(0, 10**6), finished=st.booleans(),
                  output_tokens=st.none() | st.integers(0, 10**6))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(entry, max_size=6), st.floats(0, 0.5), st.none() | st.just("m")), max_size=25))
def test_any_trace_round_trips(tmp_path, rows):
    t, steps = 0.0, []
    for k, (reqs, dt, model) in enumerate(rows):
        steps.append(StepRecord(step=2 * k, t_start=t, t_end=t + dt, requests=reqs, model=model))
        t += dt
    (tmp_path / "s.jsonl").write_bytes(b"".join(map(encode_line, steps)))
    (tmp_path / "s.parquet").write_bytes(table_bytes(tf.steps_table(steps), "steps"))
    loaded = []
    for name in ("s.jsonl", "s.parquet"):  # the same trace, or the same refusal naming the same line/row
        try:
            loaded.append(tf.load_steps_any(tmp_path / name))
        except InputError as exc:
            loaded.append((exc.reason, exc.line))
    if isinstance(loaded[0], tuple):
        assert loaded[0] == loaded[1]
    else:
        _same_trace(loaded[1], loaded[0])


def _bad_steps(tmp_path, trace, row: int, **changes):
    table = pq.read_table(trace / "steps.parquet")
    cols = {n: table.column(n).to_pylist() for n in table.schema.names}
    for k, v in changes.items():
        cols[k][row - 1] = v
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(cols), path)
    return path


@pytest.mark.parametrize("row,changes,message", [
    (9, {"step": 2}, "steps out of order"),
    (12, {"t_end": -1.0}, "is before t_start"),
    (5, {"t_start": None}, "field 't_start' is null"),
    (7, {"requests": None}, "field 'requests' is null"),
    (14, {"requests": [{"id": "x", "prefill_tokens": 0, "decode_tokens": 0, "context_tokens": 3}]},
     "scheduled with no tokens"),
    (3, {"requests": [{"id": None, "prefill_tokens": 1, "decode_tokens": 0, "context_tokens": 3}]},
     "field 'id' is null"),
])
def test_bad_steps_name_the_row(trace, tmp_path, capsys, row, changes, message):
    bad = _bad_steps(tmp_path, trace, row, **changes)
    with pytest.raises(InputError) as exc:
        tf.load_steps_any(bad)
    assert str(exc.value).startswith(f"{bad}:{row}: ") and message in str(exc.value)
    with pytest.raises(InputError) as exc:
        for _ in tf.iter_steps_parquet(bad, batch_steps=4):  # chunked: the file's row all the same
            pass
    assert str(exc.value).startswith(f"{bad}:{row}: ")


def test_bad_files_are_refused(trace, tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"t": [1.0, 2.0, float("nan")], "device": [0, 0, 0], "energy_j": [1.0, 2.0, 3.0]}), p)
    with pytest.raises(InputError, match=rf"{p}:3: t and energy_j must be finite"):
        tf.read_energy_any(p)
    pq.write_table(pa.table({"t": [1.0, 2.0, 0.5, 0.1], "device": [0, 1, 0, 1], "energy_j": [1.0] * 4}), p)
    with pytest.raises(InputError, match=rf"{p}:3: samples of device 0 out of time order"):
        tf.read_energy_any(p)
    pq.write_table(pa.table({"t": [1.0], "device": [0], "energy_j": ["1"]}), p)
    with pytest.raises(InputError, match="'energy_j' has type string"):
        tf.read_energy_any(p)
    pq.write_table(pa.table({"id": ["a", "b"], "energy_j": [1.0, 2.0]}), p)
    with pytest.raises(InputError, match="requests column 'prefill_j' is missing"):
        read_requests_any(p)
    rows = [dict(id=k, energy_j=1.0, prefill_j=0.5, decode_j=0.5, kv_j=0.1, kv_read_bytes=1.0, kv_write_bytes=1.0,
                 prompt_tokens=3, output_tokens=2, flops=1e9, stratum=None, source="nvml") for k in "abc"]
    rows[1]["energy_j"] = None
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(InputError, match=rf"{p}:2: invalid requests record: Expected `float`, got `null`"):
        read_requests_any(p)
    with pytest.raises(InputError, match="holds energy records, not steps"):
        tf.load_steps_any(trace / "energy.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        tf.load_steps_any(tmp_path / "junk.parquet")
    with pytest.raises(InputError, match="both JSON lines"):
        from wattprint.commands.convert import convert

        convert(str(trace / "steps.jsonl"), str(tmp_path / "s.jsonl"))
    assert not (tmp_path / "s.jsonl").exists()


def test_samples_and_entries_keep_optional_fields(tmp_path):
    samples = [EnergySample(0.0, 0, 1.0, "nvml"), EnergySample(0.1, 0, 2.0, None)]
    p = tmp_path / "e.parquet"
    p.write_bytes(table_bytes(tf.energy_table(samples), "energy"))
    assert tf.read_energy_any(p) == samples
