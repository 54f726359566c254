"""open_meter: names, options, and the auto fallback chain."""

from __future__ import annotations

import logging
import os

import pytest

from wattprint.errors import InputError, MeterError
from wattprint.profiler.meters import auto
from wattprint.profiler.meters.base import Reading
from wattprint.profiler.meters.cputime import CpuTimeMeter
from wattprint.profiler.meters.replay import ReplayMeter, write_energy_jsonl


@pytest.fixture
def no_nvml(monkeypatch):
    """Make NVML unavailable whatever the machine has."""
    from wattprint.profiler.meters import nvml

    def fail(*a, **k):
        raise MeterError("NVML is not available: test")

    monkeypatch.setattr(nvml.NvmlMeter, "__init__", fail)


def test_auto_falls_back_to_cputime_and_says_why(no_nvml, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="wattprint.profiler.meters.auto")
    m = auto.open_meter("auto", root=tmp_path / "no-powercap", pids=[os.getpid()])
    assert isinstance(m, CpuTimeMeter)
    assert m.pids == [os.getpid()]
    assert m.source == "cputime-estimate"
    assert "picked cputime" in m.auto_reason
    assert "nvml: NVML is not available" in m.auto_reason
    assert "rapl: RAPL: no powercap directory" in m.auto_reason
    assert "picked cputime" in caplog.text


def test_auto_picks_rapl_when_present(no_nvml, tmp_path):
    pkg = tmp_path / "intel-rapl:0"
    pkg.mkdir()
    (pkg / "name").write_text("package-0\n")
    (pkg / "energy_uj").write_text("5\n")
    (pkg / "max_energy_range_uj").write_text("1000000\n")
    m = auto.open_meter("auto", root=tmp_path)
    assert m.source == "rapl"
    assert m.auto_reason.startswith("picked rapl")


def test_auto_every_candidate_failing(no_nvml, tmp_path, monkeypatch):
    from wattprint.profiler.meters import cputime

    def fail(*a, **k):
        raise MeterError("cputime broken")

    monkeypatch.setattr(cputime.CpuTimeMeter, "__init__", fail)
    with pytest.raises(MeterError, match="no meter could be opened.*nvml.*rapl.*cputime broken"):
        auto.open_meter("auto", root=tmp_path / "none")


def test_named_meters_and_options(tmp_path):
    path = tmp_path / "energy.jsonl"
    write_energy_jsonl(path, [Reading(1.0, (2.0,), "rapl")])
    m = auto.open_meter("replay", path=path)
    assert isinstance(m, ReplayMeter) and m.source == "replay:rapl"
    assert m.auto_reason == "replay requested"
    assert isinstance(auto.open_meter("CPUTIME", idle_power_w=1.0), CpuTimeMeter)
    with pytest.raises(InputError, match="unknown meter"):
        auto.open_meter("geiger")
    with pytest.raises(InputError, match="takes no option"):
        auto.open_meter("cputime", bogus=1)
    with pytest.raises(InputError, match="bogus"):
        auto.open_meter("auto", bogus=1)
    with pytest.raises(MeterError, match="RAPL"):
        auto.open_meter("rapl", root=tmp_path / "none")


def test_simulated_is_imported_lazily(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wattprint.profiler.meters.simulated", None)
    with pytest.raises(MeterError, match="simulated meter is not available"):
        auto.open_meter("simulated")


def test_simulated_through_open_meter():
    pytest.importorskip("wattprint.profiler.meters.simulated")
    m = auto.open_meter("simulated", n_devices=2)
    assert m.source == "simulated"
    assert len(m.read().energy_j) == 2
