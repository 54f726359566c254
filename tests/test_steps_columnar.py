"""steps.jsonl lines with their requests as columns (what wattprint writes, ``docs/formats.md``) and with one
object per request (older files): every reader gives the same records, columns, attribution and refusals
(`FILE:LINE: reason`) for either form, and for files mixing them line by line."""

from __future__ import annotations

import json
import multiprocessing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fastload import _compact, _same_compact  # the shared checks of compact traces
from test_tracefiles import _same_trace

from wattprint.cli import main
from wattprint.errors import InputError
from wattprint.profiler.core import parallel, records
from wattprint.profiler.core import tracefiles as tf
from wattprint.profiler.core.records import RequestEntry, StepRecord, encode_line, step_line
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate

BIG = 1 << 30  # one chunk whatever the file


@pytest.fixture(scope="module")
def trace(tmp_path_factory, llama8b, h100):
    d = tmp_path_factory.mktemp("columnar")
    simulate(llama8b, h100, WorkloadSpec(requests=40, rate_rps=8, seed=3)).write(d)
    return d


def _forms(steps: list[StepRecord], tmp_path) -> dict:
    """The same steps as columns, as one object per request, and alternating line by line."""
    cols, entries = [step_line(s) for s in steps], [encode_line(s) for s in steps]
    files = {"columns": cols, "entries": entries,
             "mixed": [c if i % 2 else e for i, (c, e) in enumerate(zip(cols, entries))]}
    for name, lines in files.items():
        (tmp_path / f"{name}.jsonl").write_bytes(b"".join(lines))
    return {name: tmp_path / f"{name}.jsonl" for name in files}


def _outcome(read):
    try:
        return read()
    except InputError as exc:
        return exc.reason, exc.line


entry = st.builds(RequestEntry, id=st.sampled_from(["a", "b", "c", "dé", "e"]), prefill_tokens=st.integers(-1, 40),
                  decode_tokens=st.integers(0, 2), context_tokens=st.integers(0, 1 << 25),
                  stratum=st.none() | st.sampled_from(["x", "y"]), prompt_tokens=st.none() | st.integers(0, 99),
                  finished=st.booleans(), output_tokens=st.none() | st.integers(0, 99))
batches = st.lists(st.tuples(st.lists(entry, max_size=5), st.floats(0, 0.5), st.none() | st.just("m")),
                   min_size=1, max_size=20)


def _steps(rows) -> list[StepRecord]:
    t, steps = 0.0, []
    for k, (reqs, dt, model) in enumerate(rows):
        steps.append(StepRecord(step=2 * k, t_start=t, t_end=t + dt, requests=reqs, model=model))
        t += dt
    return steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches)
def test_both_forms_and_mixed_files_read_alike(tmp_path, llama8b, rows):
    """Records, entry columns, the compact trace (records path, column path on one core and on two) or
    the same refusal naming the same line, whichever form each line is in."""
    files = _forms(_steps(rows), tmp_path)
    want_trace = _outcome(lambda: records.load_steps(files["entries"]))
    want = _outcome(lambda: _compact(llama8b, records.iter_step_chunks(files["entries"], BIG)))
    for name, path in files.items():
        got_trace = _outcome(lambda p=path: records.load_steps(p))
        if isinstance(want_trace, tuple):
            assert got_trace == want_trace, name
        else:
            _same_trace(got_trace, want_trace)
        for read in (lambda p=path: records.iter_step_chunks(p, BIG),
                     lambda p=path: parallel.iter_step_columns(p, BIG, cores=1)):
            got = _outcome(lambda r=read: _compact(llama8b, r()))
            if isinstance(want, tuple):
                assert got == want, name
            else:
                _same_compact(got, want)
        # on two cores, chunks of a line or two: what the sequential path gives with the same chunks
        seq = _outcome(lambda p=path: _compact(llama8b, records.iter_step_chunks(p, 200)))
        two = _outcome(lambda p=path: _compact(llama8b, parallel.iter_step_columns(p, 200, cores=2)))
        if isinstance(seq, tuple):
            assert two == seq, name
        else:
            _same_compact(two, seq)


def test_wattprint_writes_columns_and_every_reader_agrees(trace, tmp_path, llama8b):
    first = json.loads((trace / "steps.jsonl").read_bytes().split(b"\n", 1)[0])
    assert isinstance(first["requests"], dict) and set(first["requests"]) >= {"id", "prefill_tokens"}
    steps = records.load_steps(trace / "steps.jsonl").steps
    files = _forms(steps, tmp_path)
    assert files["columns"].read_bytes() == (trace / "steps.jsonl").read_bytes()
    assert files["columns"].stat().st_size < files["entries"].stat().st_size / 2
    ref = records.load_steps(files["entries"])
    for path in files.values():
        _same_trace(records.load_steps(path), ref)
        assert tf.detect_kind(path) == "steps"
    for chunk_bytes in (1500, 1 << 14):  # several chunks, on two cores: as the sequential path
        _same_compact(_compact(llama8b, parallel.iter_step_columns(files["columns"], chunk_bytes, cores=2)),
                      _compact(llama8b, records.iter_step_chunks(files["columns"], chunk_bytes)))
    assert not multiprocessing.active_children()


def test_optional_columns_only_where_given():
    e = RequestEntry
    line = json.loads(step_line(StepRecord(3, 1.0, 1.5, [e("a", 4, 0, 0), e("b", 0, 1, 7, stratum="s")])))
    assert line == {"step": 3, "t_start": 1.0, "t_end": 1.5,
                    "requests": {"id": ["a", "b"], "prefill_tokens": [4, 0], "decode_tokens": [0, 1],
                                 "context_tokens": [0, 7], "stratum": [None, "s"]}}
    line = json.loads(step_line(StepRecord(4, 2.0, 2.5, [], model="m")))
    assert line["requests"] == {"id": [], "prefill_tokens": [], "decode_tokens": [], "context_tokens": []}
    assert line["model"] == "m"


def test_attribute_gives_identical_files_from_either_form(trace, tmp_path):
    files = _forms(records.load_steps(trace / "steps.jsonl").steps, tmp_path)
    outs = []
    for name, path in files.items():
        out, summary = tmp_path / f"r-{name}.jsonl", tmp_path / f"s-{name}.json"
        assert main(["attribute", "--steps", str(path), "--energy", str(trace / "energy.jsonl"), "--model",
                     "llama-3.1-8b", "--hardware", "h100-sxm", "--out", str(out), "--summary", str(summary),
                     "-q"]) == 0
        outs.append((out.read_bytes(), summary.read_bytes().replace(str(path).encode(), b"")))
    assert outs[0] == outs[1] == outs[2]


def test_convert_round_trips_either_form(trace, tmp_path):
    files = _forms(records.load_steps(trace / "steps.jsonl").steps, tmp_path)
    for name, path in files.items():
        pq_path, back = tmp_path / f"{name}.parquet", tmp_path / f"{name}-back.jsonl"
        assert main(["convert", str(path), str(pq_path)]) == 0
        assert main(["convert", str(pq_path), str(back)]) == 0
        assert back.read_bytes() == files["columns"].read_bytes()  # written as columns, whatever was read
    _same_trace(tf.load_steps_any(tmp_path / "entries.parquet"), records.load_steps(files["columns"]))


GOOD = {"id": ["a", "b"], "prefill_tokens": [3, 0], "decode_tokens": [0, 1], "context_tokens": [0, 5]}


@pytest.mark.parametrize("requests,message", [
    ({**GOOD, "decode_tokens": [0]}, "requests field 'decode_tokens' has 1 values for 2 request ids"),
    ({**GOOD, "id": ["a"]}, "has 2 values for 1 request ids"),
    ({**GOOD, "stratum": ["s"]}, "requests field 'stratum' has 1 values for 2 request ids"),
    ({**GOOD, "output_tokens": [1, 2, 3]}, "requests field 'output_tokens' has 3 values"),
    ({**GOOD, "prefill_tokens": [3, 1.5]}, "invalid record: Expected `int`, got `float`"),
    ({**GOOD, "context_tokens": [0, "5"]}, "invalid record: Expected `int`, got `str`"),
    ({**GOOD, "id": ["a", 7]}, "invalid record: Expected `str`, got `int`"),
    ({**GOOD, "decode_tokens": [0, None]}, "invalid record: Expected `int`, got `null`"),
    ({**GOOD, "finished": [True, 1]}, "invalid record: Expected `bool | null`, got `int`"),
    ({k: v for k, v in GOOD.items() if k != "context_tokens"}, "missing required field `context_tokens`"),
    ({**GOOD, "prefill_tokens": 3}, "invalid record: Expected `array`, got `int`"),
    ({**GOOD, "prefill_tokens": [3, 10**30]}, "has a token count over"),
    ({**GOOD, "prefill_tokens": [3, -1]}, "'b' has a negative token count"),
    ({**GOOD, "prefill_tokens": [0, 0], "decode_tokens": [0, 1]}, "'a' is scheduled with no tokens"),
])
def test_a_bad_columnar_line_is_named(trace, tmp_path, requests, message):
    """Every reader refuses it naming its line (one core, two, records, a line inside a later chunk)."""
    lines = (trace / "steps.jsonl").read_bytes().splitlines(keepends=True)
    k = len(lines) * 2 // 3
    bad = json.loads(lines[k])
    bad["requests"] = requests
    path = tmp_path / "steps.jsonl"
    path.write_bytes(b"".join(lines[:k] + [json.dumps(bad).encode() + b"\n"] + lines[k + 1:]))
    errors = []
    for read in (lambda: records.load_steps(path), lambda: list(records.iter_step_chunks(path, 2000)),
                 lambda: list(parallel.iter_step_columns(path, 2000, cores=1)),
                 lambda: list(parallel.iter_step_columns(path, 2000, cores=2))):
        with pytest.raises(InputError) as exc:
            read()
        errors.append(str(exc.value))
    assert len(set(errors)) == 1 and errors[0].startswith(f"{path}:{k + 1}: ") and message in errors[0], errors
    assert not multiprocessing.active_children()


def test_metadata_given_on_a_later_entry_of_a_later_chunk_as_columns(tmp_path, llama8b):
    """Stratum and prompt length given late (a later entry of a later chunk), the engine's output count
    on the last: the workers' sparse metadata, as columns, gives what the records give."""
    e = RequestEntry
    rows = [([e("a", 5, 0, 0)], 0.1)] * 40 + [([e("a", 0, 1, 5)], 0.1), ([e("a", 0, 1, 6, stratum="s", prompt_tokens=9)], 0.1)]
    rows += [([e("b", 0, 1, k), e("a", 0, 1, 7 + k)], 0.1) for k in range(40)]
    rows += [([e("b", 0, 1, 40, stratum="t", prompt_tokens=3, output_tokens=41, finished=True)], 0.1)]
    path = tmp_path / "s.jsonl"
    path.write_bytes(b"".join(map(step_line, _steps([(r, dt, None) for r, dt in rows]))))
    for chunk_bytes in (1000, 2000):
        ref = _compact(llama8b, records.iter_step_chunks(path, chunk_bytes))
        _same_compact(_compact(llama8b, parallel.iter_step_columns(path, chunk_bytes, cores=2)), ref)
        _same_compact(_compact(llama8b, parallel.iter_step_columns(path, chunk_bytes, cores=1)), ref)
        t = ref.table
        assert t.stratum[t.slots["a"]] == "s" and t.stratum[t.slots["b"]] == "t"
        assert t.col("prompt_tokens")[t.slots["b"]] == 3 and t.col("given_output_tokens")[t.slots["b"]] == 41


def test_no_temporary_directory_reads_on_this_core(trace, llama8b, monkeypatch):
    """The workers hand their results over in unnamed temporary files: where none can be made, the file
    is read here alone, to the same columns."""
    import tempfile

    def refuse(*a, **k):
        raise OSError(28, "No space left on device")

    path = trace / "steps.jsonl"
    want = _compact(llama8b, records.iter_step_chunks(path, 1500))
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    _same_compact(_compact(llama8b, parallel.iter_step_columns(path, 1500, cores=2)), want)
    assert not multiprocessing.active_children()
