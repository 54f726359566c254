"""``wattprint sidecar``: receive engine steps, attribute energy online, serve /metrics."""

from __future__ import annotations

from wattprint.profiler.sidecar.daemon import add_sidecar_arguments as add_arguments  # noqa: F401
from wattprint.profiler.sidecar.daemon import run_sidecar as run  # noqa: F401
