"""Where the shipped configuration lives: inside the wheel (``wattprint/configs``) or, in a
source checkout, the repository's top-level ``configs/``."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The directory holding ``hardware/``, ``strata.yaml`` and the other shipped configs."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "hardware").is_dir():
            return candidate
    raise FileNotFoundError("wattprint's configs/ directory is missing from this installation")
