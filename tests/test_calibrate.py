"""`wattprint calibrate`: the simulated calibration recovers a TRUE profile; failures leave no profile."""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import pytest
import yaml

from wattprint.commands import calibrate as calibrate_command
from wattprint.errors import MeterError
from wattprint.kernels import KernelWork
from wattprint.profiler.calibrate.analysis import RunResult, counter_window
from wattprint.profiler.calibrate.fit import fit_energy_model
from wattprint.profiler.calibrate.plan import RunSpec, build_plan, launches_needed
from wattprint.profiler.calibrate.procedure import calibrate
from wattprint.profiler.calibrate.simdevice import SimulatedDevice
from wattprint.profiler.calibrate.stats import student_t_cdf, student_t_quantile
from wattprint.profiler.core.hardware import load_profile, profile_from_dict
from wattprint.profiler.twin.power import poll_counter

TRUE = {
    "name": "test-gpu",
    "tdp_w": 700.0,
    "idle_power_w": 65.0,
    "static_power_w": 140.0,
    "energy_per_flop_j": 6.0e-13,
    "energy_per_byte_j": 9.0e-11,
    "energy_per_kv_byte_j": 1.25e-10,  # distinct from energy_per_byte_j: the fit must tell them apart
    "peak_flops": 9.89e14,
    "peak_bandwidth_bytes_s": 3.35e12,
}
FITTED = ("static_power_w", "energy_per_flop_j", "energy_per_byte_j", "energy_per_kv_byte_j")


@pytest.fixture()
def true_yaml(tmp_path):
    path = tmp_path / "true.yaml"
    path.write_text(yaml.safe_dump(TRUE))
    return path


def run_cli(*argv: str) -> int:
    parser = calibrate_command.add_arguments(argparse.ArgumentParser(prog="wattprint calibrate"))
    return calibrate_command.run(parser.parse_args(list(argv)))


# ------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize(
    ("p", "dof", "expected"),
    [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 5, 2.570582), (0.975, 30, 2.042272),
     (0.995, 10, 3.169273), (0.025, 8, -2.306004), (0.5, 3, 0.0), (0.975, 1e9, 1.959964)],
)
def test_student_t_quantile_matches_tables(p, dof, expected):
    assert student_t_quantile(p, dof) == pytest.approx(expected, abs=2e-6)


def _run(duration, flops, dram, kv, energy):
    spec = RunSpec("synthetic", "synthetic", {}, KernelWork(0, 0))
    return RunResult(spec, 1, energy, duration, flops, dram, kv)


def test_fit_is_exact_on_noiseless_data():
    rng = np.random.default_rng(1)
    truth = np.array([150.0, 7e-13, 1e-10, 1.2e-10])
    runs = []
    for _ in range(12):
        row = np.array([rng.uniform(4, 6), rng.uniform(0, 5e14), rng.uniform(0, 1e13), rng.uniform(0, 1e13)])
        runs.append(_run(*row, energy=float(row @ truth)))
    fit = fit_energy_model(runs)
    assert fit.names == list(FITTED)
    np.testing.assert_allclose(fit.estimate, truth, rtol=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.dof == 8


def test_fit_leaves_out_columns_without_signal():
    runs = [_run(5.0, f, b, 0.0, energy=150 * 5.0 + 7e-13 * f + 1e-10 * b)
            for f, b in [(1e14, 1e12), (3e14, 2e12), (0.0, 9e12), (2e14, 0.0), (4e14, 5e12)]]
    fit = fit_energy_model(runs)
    assert fit.names == ["static_power_w", "energy_per_flop_j", "energy_per_byte_j"]
    assert fit.get("energy_per_kv_byte_j") is None


# --------------------------------------------------------------------------------- measurement
def test_counter_window_snaps_to_republications():
    # A 100 W device whose counter republishes every 100 ms, polled every 2 ms.
    pub = np.arange(0.0, 10.0, 0.1) + 0.037
    polls = np.arange(0.0, 10.0, 0.002)
    values = 100.0 * pub
    e = poll_counter(pub, values, polls)
    ta, tb, joules = counter_window(polls, e, 2.0, 7.0)
    assert 2.0 <= ta < 2.1 and 6.9 < tb <= 7.0
    assert joules / (tb - ta) == pytest.approx(100.0, rel=2e-3)
    with pytest.raises(MeterError, match="raise --seconds"):
        counter_window(polls, e, 2.0, 2.09)  # one republication only


def test_launches_needed_follows_the_5_s_or_32_iterations_rule():
    assert launches_needed(0.001, 5.0, 1.0) == 6000  # time-bound: 6 s of 1 ms launches
    assert launches_needed(0.1, 1.0, 0.2) == 2 + 32  # 32 launches after the rise time
    assert launches_needed(1.0, 5.0, 1.0) == 21  # 32 would take > 4 x 5 s: capped


def test_plan_is_randomised_complete_and_streams_from_dram():
    a = build_plan(132, trials=2, rng=np.random.default_rng(0))
    b = build_plan(132, trials=2, rng=np.random.default_rng(1))
    assert [s.label for s in a] != [s.label for s in b]
    labels = [s.label for s in a]
    assert all(labels.count(x) == 2 for x in labels)
    assert {s.kernel for s in a} == {"stream_sum", "stream_copy", "compute", "intensity", "kv_gather"}
    l2_bytes = 50 << 20  # H100
    for s in a:
        if s.kernel in ("stream_sum", "stream_copy", "intensity", "kv_gather"):
            assert s.work.total_bytes >= 8 * l2_bytes, s.label
        if s.kernel == "compute":
            assert s.work.intensity > 1e4, s.label  # DRAM traffic negligible
    assert {s.params["order"] for s in a if s.kernel == "kv_gather"} == {"sequential", "random"}
    assert len({s.params["context"] for s in a if s.kernel == "kv_gather"}) >= 3


# ------------------------------------------------------------------------- simulated calibration
@pytest.mark.parametrize("seed", [1, 3, 4])
def test_simulated_calibration_recovers_the_true_profile(tmp_path, true_yaml, seed, capsys):
    """Unity sensor gain: the fit must find the TRUE coefficients themselves (see the gain test)."""
    out = tmp_path / "profile.yaml"
    rc = run_cli("--meter", "simulated", "--simulate", str(true_yaml), "--sensor-gain", "1.0",
                 "--seed", str(seed), "--out", str(out))
    assert rc == 0
    prof = load_profile(out)
    fit = prof.fit
    for key in FITTED:
        got = getattr(prof, key)
        assert got == pytest.approx(TRUE[key], rel=0.05), key
        # 95 % intervals: each holds the truth for ~95 % of seeds (see the coverage test); these do
        lo, hi = fit["intervals"][key]
        assert lo <= TRUE[key] <= hi, (key, lo, hi)
    assert prof.idle_power_w == pytest.approx(TRUE["idle_power_w"], rel=0.01)
    assert prof.tdp_w == TRUE["tdp_w"]
    for key in ("date", "device", "driver", "meter", "r2", "intervals", "runs", "dof", "std_errors"):
        assert key in fit, key
    assert fit["meter"] == "simulated" and fit["device"] == "simulated test-gpu"
    assert fit["runs"] == len(build_plan(132, 2))
    assert fit["r2"] > 0.99
    assert 0.5e12 < prof.peak_flops < TRUE["peak_flops"]
    assert 2e12 < prof.peak_bandwidth_bytes_s < TRUE["peak_bandwidth_bytes_s"]
    assert out.read_text().startswith("# Calibrated by `wattprint calibrate --meter simulated`")
    printed = capsys.readouterr().out
    assert "energy_per_kv_byte_j" in printed and "R²" in printed


def test_sensor_gain_scales_what_calibration_recovers(tmp_path, true_yaml):
    """A board gain g scales every joule the counter reports: self-calibration recovers g × truth."""
    out = tmp_path / "p.yaml"
    assert run_cli("--meter", "simulated", "--simulate", str(true_yaml), "--seed", "5", "--out", str(out)) == 0
    prof = load_profile(out)
    g = prof.fit["simulation"]["sensor_gain"]
    assert 0.96 <= g <= 1.04 and abs(g - 1.0) > 0.005
    for key in FITTED:
        seen = g * TRUE[key]
        assert getattr(prof, key) == pytest.approx(seen, rel=0.05), key
        lo, hi = prof.fit["intervals"][key]
        assert lo <= seen <= hi, key
    assert prof.idle_power_w == pytest.approx(g * TRUE["idle_power_w"], rel=0.005)
    assert "not corrected" in prof.fit["counter_gain"]


def test_confidence_intervals_cover_the_truth_about_95_percent_of_the_time():
    true = profile_from_dict(TRUE)
    hits = {k: 0 for k in FITTED}
    n = 40
    for seed in range(100, 100 + n):
        dev = SimulatedDevice(true, seed=seed)
        res = calibrate(dev, seed=seed)
        seen = res.truth["through_counter"]
        for k in FITTED:
            lo, hi = res.fit.interval(k)
            hits[k] += lo <= seen[k] <= hi
            assert res.fit.get(k) == pytest.approx(seen[k], rel=0.05), (seed, k)
    for k in FITTED:
        # nominal 95 %: 32 or fewer of 40 happens with probability < 0.1 % if the intervals are honest
        assert hits[k] >= 33, (k, hits[k])


def test_simulated_time_does_not_elapse():
    import time

    dev = SimulatedDevice(profile_from_dict(TRUE), seed=0)
    t = time.perf_counter()
    calibrate(dev, seed=0)
    assert dev.t > 400.0  # about 8 minutes of virtual GPU time ...
    assert time.perf_counter() - t < 10.0  # ... simulated, not waited for


def test_default_true_profile_is_the_shipped_h100(tmp_path):
    out = tmp_path / "p.yaml"
    assert run_cli("--meter", "simulated", "--out", str(out), "--name", "sim-h100") == 0
    prof = load_profile(out)
    assert prof.name == "sim-h100" and prof.fit["simulation"]["true_profile"] == "h100-sxm"
    assert prof.energy_per_kv_byte_j is not None


# --------------------------------------------------------------------------------------- failures
def _nvml_works() -> bool:
    try:
        from wattprint.profiler.meters.nvml import NvmlMeter

        NvmlMeter(devices=[0]).close()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(_nvml_works(), reason="this machine has a working NVIDIA GPU")
def test_nvml_without_gpu_exits_2_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert run_cli("--meter", "nvml", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "cannot calibrate GPU 0 with NVML" in err and "--meter simulated" in err
    assert not out.exists()


def test_nvml_unsupported_gpu_exits_2(tmp_path, capsys, monkeypatch):
    from wattprint.profiler.meters import nvml

    class Unsupported:
        def __init__(self, devices=None, **kw):
            raise MeterError(f"GPU {devices[0]!r} offers neither the NVML energy counter nor a power reading")

    monkeypatch.setattr(nvml, "NvmlMeter", Unsupported)
    out = tmp_path / "p.yaml"
    assert run_cli("--meter", "nvml", "--device", "3", "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "GPU 3" in err and "offers neither" in err
    assert not out.exists()


def test_missing_nvml_module_exits_2(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wattprint.profiler.meters.nvml", None)  # import raises ImportError
    assert run_cli("--meter", "nvml", "--out", str(tmp_path / "p.yaml")) == 2
    assert "cannot calibrate" in capsys.readouterr().err


def test_simulate_needs_the_simulated_meter(tmp_path, true_yaml, capsys):
    assert run_cli("--meter", "nvml", "--simulate", str(true_yaml), "--out", str(tmp_path / "p.yaml")) == 2
    assert "--meter simulated" in capsys.readouterr().err


def test_bad_true_profile_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntdp_w: 700\n")
    assert run_cli("--meter", "simulated", "--simulate", str(bad), "--out", str(tmp_path / "p.yaml")) == 2
    assert "lacks" in capsys.readouterr().err


def test_keyboard_interrupt_during_the_runs_leaves_no_file(tmp_path, true_yaml, monkeypatch, capsys):
    calls = {"n": 0}
    real_run = SimulatedDevice.run

    def run(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_run(self, *a, **kw)

    monkeypatch.setattr(SimulatedDevice, "run", run)
    out = tmp_path / "profile.yaml"
    assert run_cli("--meter", "simulated", "--simulate", str(true_yaml), "--out", str(out)) == 130
    assert "no profile written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [true_yaml]


def test_keyboard_interrupt_while_writing_keeps_the_previous_profile(tmp_path, true_yaml, monkeypatch):
    out = tmp_path / "profile.yaml"
    out.write_text("previous\n")

    def replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    assert run_cli("--meter", "simulated", "--simulate", str(true_yaml), "--out", str(out)) == 130
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.yaml", "true.yaml"]


def test_student_t_cdf_is_a_cdf():
    xs = [-5, -1, 0, 0.5, 3]
    vals = [student_t_cdf(x, 4) for x in xs]
    assert vals == sorted(vals) and vals[2] == pytest.approx(0.5)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.5 + math.atan(1.0) / math.pi)


def test_discarding_the_rise_time_matters():
    """The simulated power lags each run's start by ~0.15 s: keeping that lag biases every coefficient."""
    true = profile_from_dict(TRUE)
    kept = calibrate(SimulatedDevice(true, seed=2), seed=2, rise_s=0.0)
    dropped = calibrate(SimulatedDevice(true, seed=2), seed=2)
    seen = kept.truth["through_counter"]
    assert kept.fit.get("energy_per_flop_j") < 0.985 * seen["energy_per_flop_j"]
    assert dropped.fit.get("energy_per_flop_j") == pytest.approx(seen["energy_per_flop_j"], rel=0.01)
