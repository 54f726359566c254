"""CPU packages and their DRAM through Linux powercap RAPL (``/sys/class/powercap/intel-rapl:*``).

Zones: each top-level zone ``intel-rapl:N`` whose ``name`` starts with ``package`` is one CPU socket;
its ``dram`` subzone (``intel-rapl:N:M`` named ``dram``), where the platform has one, counts the memory
attached to it. **One device per package: package energy + DRAM energy, summed.** The ``core`` and
``uncore`` subzones are parts of the package and are not added; ``psys`` (the whole platform, on some
laptops) would double count and is skipped. AMD Zen CPUs expose the same ``intel-rapl`` zones.

Each zone's ``energy_uj`` is a counter in microjoules that wraps at ``max_energy_range_uj``: a value
lower than the previous one is a wrap and adds ``max_energy_range_uj``. Read more often than once per
wrap period (minutes at full power); the timeline polls at 50 Hz. ``Reading.energy_j`` are joules since
the meter was opened.

Since Linux 5.10 ``energy_uj`` is readable by root only (CVE-2020-8694): the error says how to fix it.
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from wattprint.errors import MeterError
from wattprint.profiler.meters.base import DeviceInfo, Meter, Reading

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
_TOP_ZONE = re.compile(r"^intel-rapl:(\d+)$")
_SUB_ZONE = re.compile(r"^intel-rapl:(\d+):(\d+)$")


def _read_file(path: Path) -> str:
    """Read one sysfs attribute (a function of its own so tests can make it fail)."""
    return path.read_text()


def _read_attr(path: Path, root: Path) -> str:
    try:
        return _read_file(path).strip()
    except PermissionError as exc:
        raise MeterError(
            f"RAPL: permission denied reading {path}. Since Linux 5.10 the RAPL energy counters are "
            f"readable by root only. Run as root, or grant read access: "
            f"`sudo chmod o+r {root}/intel-rapl:*/energy_uj {root}/intel-rapl:*/intel-rapl:*/energy_uj` "
            f"(a udev rule or systemd-tmpfiles entry keeps it across reboots)"
        ) from exc
    except FileNotFoundError as exc:
        raise MeterError(f"RAPL: {path} is missing (zone removed, or not a powercap RAPL zone)") from exc
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise MeterError(f"RAPL: permission denied reading {path} (run as root)") from exc
        raise MeterError(f"RAPL: cannot read {path}: {exc.strerror or exc}") from exc


def _read_int(path: Path, root: Path) -> int:
    text = _read_attr(path, root)
    try:
        return int(text)
    except ValueError:
        raise MeterError(f"RAPL: {path} holds {text!r}, not an integer") from None


@dataclass
class RaplZone:
    """One powercap zone: one counter, its wrap range, and the last value read."""

    path: Path
    name: str
    max_range_uj: int
    last_uj: int = 0
    total_uj: int = 0  # microjoules counted since the meter was opened, wraps included
    wraps: int = 0

    def energy_uj(self, root: Path) -> int:
        return _read_int(self.path / "energy_uj", root)

    def advance(self, value_uj: int) -> None:
        delta = value_uj - self.last_uj
        if delta < 0:
            delta += self.max_range_uj
            self.wraps += 1
            if delta < 0:  # not a wrap we can explain (range misreported); count nothing
                log.warning("RAPL zone %s went from %d to %d uJ", self.path.name, self.last_uj, value_uj)
                delta = 0
        self.total_uj += delta
        self.last_uj = value_uj


class RaplMeter(Meter):
    """Joules per CPU package (package + its DRAM zone) since the meter was opened."""

    source = "rapl"

    def __init__(self, root: str | Path = DEFAULT_ROOT):
        self.root = Path(root)
        self._lock = threading.Lock()
        if not self.root.is_dir():
            raise MeterError(
                f"RAPL: no powercap directory at {self.root} (not Linux, the intel_rapl_msr module is not "
                f"loaded - try `sudo modprobe intel_rapl_msr` - or /sys is not mounted in this container)"
            )
        self._packages: list[list[RaplZone]] = []
        self._devices: list[DeviceInfo] = []
        skipped = []
        for top in sorted(
            (p for p in self.root.iterdir() if _TOP_ZONE.match(p.name)),
            key=lambda p: int(_TOP_ZONE.match(p.name).group(1)),
        ):
            name = _read_attr(top / "name", self.root)
            if not name.startswith("package"):
                skipped.append(f"{top.name} ({name})")
                continue
            zones = [self._zone(top, name)]
            for sub in sorted(p for p in top.iterdir() if _SUB_ZONE.match(p.name)):
                sub_name = _read_attr(sub / "name", self.root)
                if sub_name == "dram":
                    zones.append(self._zone(sub, sub_name))
            self._devices.append(
                DeviceInfo(
                    index=len(self._packages),
                    name=name,
                    extra={"zones": [str(z.path) for z in zones], "dram": len(zones) > 1},
                )
            )
            self._packages.append(zones)
        if skipped:
            log.debug("RAPL: skipped zones %s", ", ".join(skipped))
        if not self._packages:
            raise MeterError(f"RAPL: no package zone (intel-rapl:N named package-*) under {self.root}")
        for zones in self._packages:  # baseline: joules count from here
            for zone in zones:
                zone.last_uj = zone.energy_uj(self.root)

    def _zone(self, path: Path, name: str) -> RaplZone:
        max_range = _read_int(path / "max_energy_range_uj", self.root)
        if max_range <= 0:
            raise MeterError(f"RAPL: {path / 'max_energy_range_uj'} is {max_range}, expected > 0")
        return RaplZone(path=path, name=name, max_range_uj=max_range)

    @property
    def devices(self) -> list[DeviceInfo]:
        return list(self._devices)

    @property
    def wraps(self) -> int:
        """How many counter wrap-arounds were handled, all zones."""
        return sum(z.wraps for zones in self._packages for z in zones)

    def read(self) -> Reading:
        with self._lock:
            t_before = time.monotonic()
            values = [[z.energy_uj(self.root) for z in zones] for zones in self._packages]
            t_s = (t_before + time.monotonic()) / 2.0
            energies = []
            for zones, vals in zip(self._packages, values, strict=True):
                for zone, v in zip(zones, vals, strict=True):
                    zone.advance(v)
                energies.append(sum(z.total_uj for z in zones) / 1e6)
            return Reading(t_s=t_s, energy_j=tuple(energies), source=self.source)
