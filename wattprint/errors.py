"""wattprint's own exceptions. Vendor and parser errors are mapped to these at our boundaries."""

from __future__ import annotations


class WattprintError(Exception):
    """Base class of every error wattprint raises on purpose."""


class InputError(WattprintError):
    """Bad user input: names the file and, where known, the 1-based line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        self.reason = message
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class ConfigError(InputError):
    """A model config or hardware profile that wattprint cannot use."""


class MeterError(WattprintError):
    """A meter could not be opened or read (no device, no permission, unsupported device)."""


class ConservationError(WattprintError):
    """Measured joules were not given exactly once to requests or idle: a bug, never bad input. The CLI
    exits with code 3 and writes no output."""

    #: the largest conservation error tolerated (relative to the measured energy)
    TOLERANCE = 1e-9
