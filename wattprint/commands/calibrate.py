"""``wattprint calibrate``: measure a GPU's energy coefficients and write a hardware profile."""

from __future__ import annotations

from wattprint.profiler.calibrate.legacy import add_calibrate_arguments as add_arguments  # noqa: F401
from wattprint.profiler.calibrate.legacy import run_calibrate as run  # noqa: F401
