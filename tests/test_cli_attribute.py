"""`wattprint attribute` end to end, and its handling of bad input (exit 2, file:line, no output)."""

import json
import subprocess
import sys

import pytest

from wattprint.cli import main
from wattprint.profiler.twin.simulate import WorkloadSpec, simulate


@pytest.fixture(scope="module")
def trace(tmp_path_factory, llama8b, h100):
    d = tmp_path_factory.mktemp("trace")
    sim = simulate(llama8b, h100, WorkloadSpec(requests=40, rate_rps=6, seed=5))
    sim.write(d)
    return d


def run(trace, tmp_path, steps=None, energy=None, model="llama-3.1-8b", hardware="h100-sxm"):
    out, summ = tmp_path / "requests.jsonl", tmp_path / "summary.json"
    rc = main(["attribute", "--steps", str(steps or trace / "steps.jsonl"),
               "--energy", str(energy or trace / "energy.jsonl"), "--model", str(model),
               "--hardware", str(hardware), "--out", str(out), "--summary", str(summ), "-q"])
    return rc, out, summ


def test_attribute_writes_requests_and_summary(trace, tmp_path):
    rc, out, summ = run(trace, tmp_path)
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 40
    for r in lines:
        for key in ("id", "energy_j", "prefill_j", "decode_j", "kv_j", "kv_read_bytes", "kv_write_bytes",
                    "prompt_tokens", "flops", "stratum"):
            assert key in r
        assert r["prefill_j"] + r["decode_j"] == pytest.approx(r["energy_j"], rel=1e-12)
    s = json.loads(summ.read_text())
    assert s["source"] == "simulated"
    assert s["attributed_j"] + s["idle_j"] == pytest.approx(s["measured_j"], rel=1e-9)
    assert s["hardware"] == "h100-sxm" and s["model"] == "llama-3.1-8b"


def test_console_script_runs(trace, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wattprint.cli", "attribute", "--steps", str(trace / "steps.jsonl"),
                           "--energy", str(trace / "energy.jsonl"), "--model", "llama-3.1-8b",
                           "--hardware", "h100-sxm", "--out", str(tmp_path / "r.jsonl"), "--limit", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SIMULATED" in proc.stdout and "Totals" in proc.stdout


def _corrupt(trace, tmp_path, name, lineno, replacement):
    lines = (trace / name).read_text().splitlines()
    lines[lineno - 1] = replacement
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("lineno,replacement,message", [
    (7, '{"step": 6, "t_start": 1.0', "malformed JSON"),
    (9, '{"step": "x", "t_start": 1.0, "t_end": 1.1, "requests": []}', "Expected `int`"),
    (12, '{"step": 11, "t_start": 1.0, "t_end": 1.1, "requests": [{"id": "a", "prefill_tokens": 1.5, '
         '"decode_tokens": 0, "context_tokens": 0}]}', "Expected `int`"),
    (15, '{"step": 2, "t_start": 99999.0, "t_end": 99999.1, "requests": []}', "out of order"),
])
def test_bad_steps_exit_2_with_file_and_line(trace, tmp_path, capsys, lineno, replacement, message):
    bad = _corrupt(trace, tmp_path, "steps.jsonl", lineno, replacement)
    rc, out, summ = run(trace, tmp_path, steps=bad)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:{lineno}:" in err and message in err
    assert not out.exists() and not summ.exists()


def test_energy_that_does_not_cover_the_steps(trace, tmp_path, capsys):
    lines = (trace / "energy.jsonl").read_text().splitlines()
    short = tmp_path / "energy.jsonl"
    short.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    rc, out, _ = run(trace, tmp_path, energy=short)
    assert rc == 2
    assert "does not cover the steps" in capsys.readouterr().err and not out.exists()


def test_bad_energy_line(trace, tmp_path, capsys):
    bad = _corrupt(trace, tmp_path, "energy.jsonl", 3, '{"t": 1.0, "device": 0, "energy_j": "lots"}')
    rc, _, _ = run(trace, tmp_path, energy=bad)
    assert rc == 2 and f"{bad}:3:" in capsys.readouterr().err


def test_unmodellable_config_and_unknown_hardware(trace, tmp_path, capsys):
    moe = tmp_path / "config.json"
    moe.write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 8}))
    rc, out, _ = run(trace, tmp_path, model=moe)
    assert rc == 2 and "mixture of experts" in capsys.readouterr().err and not out.exists()
    rc, _, _ = run(trace, tmp_path, hardware="tpu-v9")
    assert rc == 2 and "no hardware profile" in capsys.readouterr().err


def test_existing_output_is_kept_on_error(trace, tmp_path):
    out = tmp_path / "requests.jsonl"
    out.write_text("previous\n")
    bad = _corrupt(trace, tmp_path, "steps.jsonl", 2, "garbage")
    rc, _, _ = run(trace, tmp_path, steps=bad)
    assert rc == 2 and out.read_text() == "previous\n"


def test_online_replay_writes_the_same_files_and_conserves(trace, tmp_path, llama8b, h100):
    """`attribute --online --meter-hz 50` runs the sidecar's streaming core on the recorded trace."""
    off_rc, off_out, _ = run(trace, tmp_path / "off")
    out, summ = tmp_path / "on.jsonl", tmp_path / "on.json"
    rc = main(["attribute", "--steps", str(trace / "steps.jsonl"), "--energy", str(trace / "energy.jsonl"),
               "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--out", str(out), "--summary", str(summ),
               "--online", "--meter-hz", "50", "-q"])
    assert rc == 0 and off_rc == 0
    online = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    offline = {r["id"]: r for r in map(json.loads, off_out.read_text().splitlines())}
    assert set(online) == set(offline) and all(r["status"] == "final" for r in online.values())
    s = json.loads(summ.read_text())
    assert s["driver"] == "online" and s["meter_hz"] == 50
    assert abs(sum(r["energy_j"] for r in online.values()) + s["idle_j"] - s["measured_j"]) <= 1e-9 * s["measured_j"]
    # the two drivers fit differently (global vs running) but land close on the same trace
    total_on = sum(r["energy_j"] for r in online.values())
    total_off = sum(r["energy_j"] for r in offline.values())
    assert total_on == pytest.approx(total_off, rel=0.05)


def test_meter_hz_needs_online(trace, tmp_path, capsys):
    rc = main(["attribute", "--steps", str(trace / "steps.jsonl"), "--energy", str(trace / "energy.jsonl"),
               "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--out", str(tmp_path / "x.jsonl"),
               "--meter-hz", "50", "-q"])
    assert rc == 2 and "--online" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_a_conservation_violation_fails_loudly_and_writes_nothing(trace, tmp_path, monkeypatch, capsys):
    """A bug that loses joules must not produce plausible files: exit 3, no output."""
    import wattprint.profiler.attribution.offline as offline

    real = offline.attribute

    def leaky(*a, **kw):
        res = real(*a, **kw)
        res.requests[0].energy_j *= 0.5  # a record loses joules the totals still count
        return res

    monkeypatch.setattr(offline, "attribute", leaky)
    rc, out, summ = run(trace, tmp_path)
    assert rc == 3 and "conservation violated" in capsys.readouterr().err
    assert not out.exists() and not summ.exists()


def test_a_file_read_in_chunks_gives_the_same_attribution(trace, llama8b, h100, monkeypatch):
    """attribute reads steps.jsonl a chunk at a time (bounded memory): same numbers as in one piece."""
    from wattprint.profiler.attribution.offline import attribute, attribute_file
    from wattprint.profiler.core import records

    samples = records.read_energy(trace / "energy.jsonl")
    whole = attribute(records.load_steps(trace / "steps.jsonl"), samples, llama8b, h100, source="simulated")
    import wattprint.profiler.attribution.offline as offline

    real = offline.iter_step_columns
    for cores in (1, 2):  # sequentially, and decoded here and on a forked worker
        monkeypatch.setattr(offline, "iter_step_columns", lambda p, c=cores: real(p, 4096, c))
        chunked = attribute_file(trace / "steps.jsonl", samples, llama8b, h100, source="simulated")
        assert [r.energy_j for r in chunked.requests] == pytest.approx([r.energy_j for r in whole.requests],
                                                                       rel=1e-12)
        assert [(r.prompt_tokens, r.output_tokens, r.stratum) for r in chunked.requests] == \
            [(r.prompt_tokens, r.output_tokens, r.stratum) for r in whole.requests]


@pytest.mark.parametrize("bad,problem", [("{not json", "malformed JSON"), ('{"step": 300, "t_start": "x"}', "invalid record"),
                                         ("OLD", "out of order")])
def test_a_bad_line_in_a_later_chunk_exits_2_naming_it_on_two_cores(trace, tmp_path, monkeypatch, capsys, bad,
                                                                       problem):
    """The parallel path (forced: small chunks, two cores) names the file's line as the sequential one."""
    import multiprocessing

    import wattprint.profiler.attribution.offline as offline

    lines = (trace / "steps.jsonl").read_text().splitlines()
    k = len(lines) * 3 // 4
    bad = lines[k].replace(f'"step":{k}', f'"step":{k - 5}') if bad == "OLD" else bad
    p = tmp_path / "steps.jsonl"
    p.write_text("\n".join(lines[:k] + [bad] + lines[k + 1:]) + "\n")
    real = offline.iter_step_columns
    errors = []
    for cores in (1, 2):
        monkeypatch.setattr(offline, "iter_step_columns", lambda q, c=cores: real(q, 4096, c))
        rc, out, _ = run(trace, tmp_path, steps=p)
        errors.append(capsys.readouterr().err)
        assert rc == 2 and f"{p}:{k + 1}: " in errors[-1] and problem in errors[-1] and not out.exists()
        assert not multiprocessing.active_children()  # the workers are gone
    assert errors[0] == errors[1]


def test_chunked_reading_names_the_files_line_across_chunks(trace, tmp_path):
    from wattprint.errors import InputError
    from wattprint.profiler.core.records import iter_step_chunks

    lines = (trace / "steps.jsonl").read_text().splitlines()
    for bad, problem in ((lines[300].replace('"step":300', '"step":3'), "out of order"),
                         ('{"step": 300, "t_start": "x"}', "invalid record")):
        p = tmp_path / "steps.jsonl"
        p.write_text("\n".join(lines[:300] + [bad] + lines[301:]) + "\n")
        with pytest.raises(InputError) as e:
            for _ in iter_step_chunks(p, chunk_bytes=2048):
                pass
        assert e.value.line == 301 and problem in str(e.value)


def test_many_instances_on_a_process_pool(tmp_path, llama8b, h100, capsys):
    dirs = []
    for seed in (1, 2, 3):
        d = tmp_path / f"gpu{seed}"
        simulate(llama8b, h100, WorkloadSpec(requests=15, rate_rps=5, seed=seed)).write(d)
        dirs.append(str(d))
    (tmp_path / "gpu2" / "energy.jsonl").write_text("not json\n")
    rc = main(["attribute", "--instances", *dirs, "--jobs", "2", "--model", "llama-3.1-8b", "--hardware", "h100-sxm"])
    assert rc == 2 and "gpu2/energy.jsonl:1" in capsys.readouterr().err
    for seed in (1, 3):
        s = json.loads((tmp_path / f"gpu{seed}" / "summary.json").read_text())
        assert s["conservation_error"] <= 1e-9
        assert len((tmp_path / f"gpu{seed}" / "requests.jsonl").read_text().splitlines()) == 15
    assert not (tmp_path / "gpu2" / "requests.jsonl").exists()


def test_parquet_traces_give_identical_numbers(trace, tmp_path):
    """`attribute` reads Parquet directly (wattprint convert) and writes the same requests.jsonl."""
    for name in ("steps", "energy"):
        assert main(["convert", str(trace / f"{name}.jsonl"), str(tmp_path / f"{name}.parquet")]) == 0
    rc, out_json, _ = run(trace, tmp_path / "json")
    rc2, out_pq, _ = run(trace, tmp_path / "pq", steps=tmp_path / "steps.parquet", energy=tmp_path / "energy.parquet")
    assert rc == rc2 == 0
    assert out_pq.read_bytes() == out_json.read_bytes()
