"""The meter interface: cumulative joules per device, a monotonic timestamp, and a source name.

Every meter returns a :class:`Reading` whose ``energy_j`` are *cumulative* joules per device since
the meter was opened (or since the counter's own origin), read at ``t_s`` on
``time.monotonic()``'s clock. ``source`` says how the figure was obtained and is carried to every
output: ``nvml``, ``rapl`` (measured), ``cputime-estimate`` (estimated), ``simulated``, ``replay:<src>``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

MEASURED_SOURCES = frozenset({"nvml", "rapl"})


@dataclass(frozen=True)
class Reading:
    """One poll of a meter: cumulative joules per device at monotonic time ``t_s``."""

    t_s: float
    energy_j: tuple[float, ...]
    source: str


@dataclass
class DeviceInfo:
    index: int
    name: str
    extra: dict = field(default_factory=dict)


class Meter(abc.ABC):
    """A source of cumulative energy. Subclasses implement one vendor or method each."""

    #: how the joules are obtained: nvml, rapl, cputime-estimate, simulated, replay
    source: str = "unknown"

    @property
    @abc.abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """The devices this meter reads, in the order of ``Reading.energy_j``."""

    @abc.abstractmethod
    def read(self) -> Reading:
        """Cumulative joules per device now. Raises :class:`wattprint.errors.MeterError`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release vendor handles."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def is_measured(source: str) -> bool:
    """True for joules read from a hardware counter, False for estimates and simulations."""
    base = source.split(":", 1)[-1] if source.startswith("replay:") else source
    return base in MEASURED_SOURCES


def source_kind(source: str) -> str:
    """``measured``, ``simulated`` or ``estimated``: how a source's joules were obtained (anything not
    read from a hardware counter nor simulated counts as estimated, never as measured)."""
    if is_measured(source):
        return "measured"
    base = source.split(":", 1)[-1] if source.startswith("replay:") else source
    return "simulated" if base.startswith("simulated") else "estimated"
