"""Small helpers shared by commands: resolving a model argument, naming an energy source."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from wattprint.configs import config_dir
from wattprint.errors import ConfigError
from wattprint.profiler.core.costmodel import ModelGeometry, geometry_from_config

METER_CHOICES = ("auto", "nvml", "rapl", "cputime", "simulated")


def model_config_path(spec: str) -> Path:
    """A config.json path, a model directory, or the name of a shipped config (configs/models), as an
    absolute path to the config file."""
    p = Path(spec)
    if not p.exists():
        shipped = config_dir() / "models" / f"{spec}.json"
        if not shipped.exists():
            names = ", ".join(sorted(x.stem for x in (config_dir() / "models").glob("*.json")))
            raise ConfigError(f"no model config file or shipped model named {spec!r} (shipped: {names})")
        p = shipped
    if p.is_dir():
        p = p / "config.json"
    return p.resolve()


def model_geometry(spec: str) -> ModelGeometry:
    """The geometry of :func:`model_config_path`'s config."""
    return geometry_from_config(model_config_path(spec))


def energy_source(samples: Iterable) -> str:
    """The one source of a run of energy samples, ``mixed`` or ``unknown``."""
    sources = {s.source for s in samples if s.source}
    return sources.pop() if len(sources) == 1 else ("mixed" if sources else "unknown")


def read_energy_file(path):
    """energy.jsonl or energy.parquet (pyarrow is imported only for Parquet)."""
    from wattprint.profiler.core.records import is_parquet

    if is_parquet(path):
        from wattprint.profiler.core.tracefiles import read_energy_any

        return read_energy_any(path)
    from wattprint.profiler.core.records import read_energy

    return read_energy(path)


def load_steps_file(path):
    """steps.jsonl or steps.parquet as a validated StepTrace (pyarrow is imported only for Parquet)."""
    from wattprint.profiler.core.records import is_parquet

    if is_parquet(path):
        from wattprint.profiler.core.tracefiles import load_steps_any

        return load_steps_any(path)
    from wattprint.profiler.core.records import load_steps

    return load_steps(path)
