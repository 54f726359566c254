"""Replay a recorded ``energy.jsonl`` as a meter (source ``replay:<recorded source>``).

Samples that share a timestamp ``t`` form one :class:`Reading`; each ``read()`` returns the next one,
and reading past the end raises :class:`MeterError` (``exhausted`` says when). Devices are the device
ids found in the file, in increasing order (``DeviceInfo.index`` is the id). A device missing from a
timestamp group keeps its previous value (before its first sample: its first value), so a file whose
devices were polled at slightly different times replays without false jumps. Times are the file's.

The source is ``replay:`` + the samples' ``source`` field (``unknown`` when absent; several distinct
sources are joined with ``+``, which :func:`~wattprint.profiler.meters.base.is_measured` does not count
as measured). Replaying a replay does not stack prefixes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from itertools import groupby
from pathlib import Path

from wattprint.errors import MeterError
from wattprint.profiler.core.records import EnergySample, encode_line, read_energy
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading


def _strip_replay(source: str) -> str:
    while source.startswith("replay:"):
        source = source[len("replay:") :]
    return source


def recorded_source(samples: Iterable[EnergySample]) -> str:
    """The source the samples were recorded from: one name, ``a+b`` when mixed, ``unknown`` when absent."""
    names = sorted({_strip_replay(s.source) for s in samples if s.source})
    return "+".join(names) if names else "unknown"


def readings_from_samples(samples: Sequence[EnergySample], source: str) -> list[Reading]:
    """Samples that share a timestamp form one reading (devices in increasing id order); a device
    missing from a group keeps its previous value (before its first sample: its first value)."""
    ids = sorted({s.device for s in samples})
    pos = {d: i for i, d in enumerate(ids)}
    first: dict[int, float] = {}
    for s in samples:
        first.setdefault(s.device, s.energy_j)
    current = [first[d] for d in ids]
    readings = []
    for t, group in groupby(sorted(samples, key=lambda s: s.t), key=lambda s: s.t):
        for s in group:
            current[pos[s.device]] = s.energy_j
        readings.append(Reading(t_s=t, energy_j=tuple(current), source=source))
    return readings


class ReplayMeter(Meter):
    """Steps through the readings of an ``energy.jsonl`` file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._samples = read_energy(self.path)  # InputError names the file and line
        self.source = f"replay:{recorded_source(self._samples)}"
        ids = sorted({s.device for s in self._samples})
        self._devices = [
            DeviceInfo(index=d, name=f"replay device {d}", extra={"path": str(self.path)}) for d in ids
        ]
        self._readings = readings_from_samples(self._samples, self.source)
        self._pos = 0
        self._lock = threading.Lock()

    @property
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    def samples(self) -> list[EnergySample]:
        """The samples as read from the file, in file order."""
        return list(self._samples)

    def readings(self) -> list[Reading]:
        """Every reading the replay yields, at once (does not move the replay position)."""
        return list(self._readings)

    @property
    def remaining(self) -> int:
        return len(self._readings) - self._pos

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._readings)

    def rewind(self) -> None:
        with self._lock:
            self._pos = 0

    def read(self) -> Reading:
        with self._lock:
            if self._pos >= len(self._readings):
                raise MeterError(f"replay of {self.path} exhausted after {len(self._readings)} readings")
            reading = self._readings[self._pos]
            self._pos += 1
            return reading


def write_energy_jsonl(
    path: str | Path, readings: Iterable[Reading], devices: Sequence[int] | None = None
) -> int:
    """Append readings to ``energy.jsonl``: one ``{"t", "device", "energy_j", "source"}`` line per device.

    ``devices`` maps positions in ``Reading.energy_j`` to device ids (default: the positions).
    Returns the number of lines written.
    """
    n = 0
    with open(path, "ab") as f:
        for r in readings:
            if devices is not None and len(devices) != len(r.energy_j):
                raise MeterError(
                    f"{len(r.energy_j)} energies in a reading but {len(devices)} device ids given"
                )
            for i, e in enumerate(r.energy_j):
                dev = devices[i] if devices is not None else i
                f.write(encode_line(EnergySample(t=r.t_s, device=dev, energy_j=float(e), source=r.source)))
                n += 1
    return n
