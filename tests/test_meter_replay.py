"""ReplayMeter and write_energy_jsonl."""

from __future__ import annotations

import json

import pytest

from wattprint.errors import InputError, MeterError
from wattprint.profiler.meters.base import Reading, is_measured
from wattprint.profiler.meters.replay import ReplayMeter, write_energy_jsonl


def test_round_trip(tmp_path):
    path = tmp_path / "energy.jsonl"
    readings = [
        Reading(t_s=10.0, energy_j=(0.0, 5.0), source="nvml"),
        Reading(t_s=10.1, energy_j=(30.0, 40.0), source="nvml"),
        Reading(t_s=10.2, energy_j=(61.5, 70.0), source="nvml"),
    ]
    assert write_energy_jsonl(path, readings[:1]) == 2
    assert write_energy_jsonl(path, readings[1:]) == 4  # appends
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"t": 10.0, "device": 0, "energy_j": 0.0, "source": "nvml"}
    assert len(lines) == 6

    m = ReplayMeter(path)
    assert m.source == "replay:nvml"
    assert is_measured(m.source)
    assert [d.index for d in m.devices] == [0, 1]
    assert len(m.samples()) == 6
    got = [m.read() for _ in range(3)]
    assert [r.t_s for r in got] == [10.0, 10.1, 10.2]
    assert [r.energy_j for r in got] == [r.energy_j for r in readings]
    assert all(r.source == "replay:nvml" for r in got)
    assert m.exhausted
    with pytest.raises(MeterError, match="exhausted"):
        m.read()
    m.rewind()
    assert m.read() == got[0]

    # replaying a replay does not stack prefixes
    path2 = tmp_path / "again.jsonl"
    write_energy_jsonl(path2, got, devices=[3, 7])
    m2 = ReplayMeter(path2)
    assert m2.source == "replay:nvml"
    assert [d.index for d in m2.devices] == [3, 7]
    assert m2.readings()[-1].energy_j == (61.5, 70.0)


def test_groups_and_carries_missing_devices(tmp_path):
    path = tmp_path / "energy.jsonl"
    path.write_text(
        '{"t": 1.0, "device": 0, "energy_j": 1.0}\n'
        '{"t": 1.5, "device": 1, "energy_j": 7.0}\n'
        '{"t": 2.0, "device": 0, "energy_j": 3.0}\n'
        '{"t": 2.0, "device": 1, "energy_j": 9.0}\n'
    )
    m = ReplayMeter(path)
    assert m.source == "replay:unknown"
    assert not is_measured(m.source)
    assert [r.energy_j for r in m.readings()] == [(1.0, 7.0), (1.0, 7.0), (3.0, 9.0)]
    assert [r.t_s for r in m.readings()] == [1.0, 1.5, 2.0]


def test_mixed_sources_are_not_measured(tmp_path):
    path = tmp_path / "energy.jsonl"
    path.write_text(
        '{"t": 1.0, "device": 0, "energy_j": 1.0, "source": "nvml"}\n'
        '{"t": 1.0, "device": 1, "energy_j": 1.0, "source": "simulated"}\n'
    )
    m = ReplayMeter(path)
    assert m.source == "replay:nvml+simulated"
    assert not is_measured(m.source)


def test_bad_file_is_input_error(tmp_path):
    path = tmp_path / "energy.jsonl"
    path.write_text('{"t": 1.0, "device": 0, "energy_j": 1.0}\n{"t": "x"}\n')
    with pytest.raises(InputError, match=":2:"):
        ReplayMeter(path)
    with pytest.raises(InputError):
        ReplayMeter(tmp_path / "missing.jsonl")
