"""CpuTimeMeter with the real psutil on this process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from wattprint.errors import MeterError
from wattprint.profiler.core.hardware import load_profile
from wattprint.profiler.meters.base import is_measured
from wattprint.profiler.meters.cputime import CpuTimeMeter


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_own_process_energy_rises_with_cpu_time():
    m = CpuTimeMeter(pids=[os.getpid()], active_power_per_core_w=10.0, idle_power_w=0.0)
    assert m.source == "cputime-estimate"
    assert not is_measured(m.source)
    r0 = m.read()
    burn(0.2)
    r1 = m.read()
    assert r1.source == "cputime-estimate"
    assert len(r1.energy_j) == 1 and len(m.devices) == 1
    # at least ~0.2 CPU seconds at 10 W per core
    assert r1.energy_j[0] - r0.energy_j[0] >= 10.0 * 0.15
    assert r1.t_s > r0.t_s


def test_idle_power_counts_wall_time():
    m = CpuTimeMeter(pids=[os.getpid()], active_power_per_core_w=0.0, idle_power_w=100.0)
    r0 = m.read()
    time.sleep(0.05)
    r1 = m.read()
    assert r1.energy_j[0] - r0.energy_j[0] == pytest.approx(100.0 * (r1.t_s - r0.t_s), rel=1e-6)


def test_children_are_included():
    m = CpuTimeMeter(pids=[os.getpid()], active_power_per_core_w=10.0, idle_power_w=0.0)
    code = "import time\ne = time.process_time() + 0.3\nwhile time.process_time() < e: pass\ntime.sleep(5)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 5
        energy = 0.0
        while time.monotonic() < deadline:
            energy = m.read().energy_j[0]
            t = psutil.Process(child.pid).cpu_times()
            if t.user + t.system >= 0.3:
                energy = m.read().energy_j[0]
                break
            time.sleep(0.02)
        assert energy >= 10.0 * 0.25
    finally:
        child.kill()
        child.wait()
    # the child is gone: its CPU time stays counted (monotone)
    assert m.read().energy_j[0] >= energy


def test_default_powers_from_cpu_profile_and_system_mode():
    m = CpuTimeMeter()
    p = load_profile("cpu")
    assert m.idle_power_w == p.idle_power_w
    assert m.active_power_per_core_w == pytest.approx((p.tdp_w - p.idle_power_w) / psutil.cpu_count())
    r0 = m.read()
    burn(0.05)
    r1 = m.read()
    assert r1.energy_j[0] > r0.energy_j[0] >= 0.0


def test_unknown_pid():
    with pytest.raises(MeterError, match="no process"):
        CpuTimeMeter(pids=[2**22 + 12345])
