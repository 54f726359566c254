"""The sidecar's default parts, chosen from its meter: the hardware profile, the attributor, the timeline."""

from __future__ import annotations

import re

from wattprint.profiler.meters.base import Meter

_NVML_PROFILES = ((r"h200", "h200"), (r"h100", "h100-sxm"), (r"a100", "a100-sxm"), (r"\bl4\b", "l4"))


def default_hardware(meter: Meter) -> str:
    """The shipped hardware profile matching a meter: NVML device name, else the CPU profile."""
    source = getattr(meter, "source", "") or ""
    if source == "simulated":
        return "h100-sxm"
    if source == "nvml":
        try:
            names = " ".join(d.name for d in meter.devices).lower()
        except Exception:  # noqa: BLE001 - a broken meter must not stop the choice
            names = ""
        return next((profile for pattern, profile in _NVML_PROFILES if re.search(pattern, names)), "h100-sxm")
    return "cpu"


def default_attributor(geometry, profile, *, n_devices, source, model_name, window_s):
    from wattprint.profiler.attribution.online import OnlineAttributor

    return OnlineAttributor(geometry, profile, n_devices=n_devices, source=source, model_name=model_name,
                            window_s=window_s)


def default_timeline(meter, rate_hz, on_reading):
    from wattprint.profiler.timeline.sampler import EnergyTimeline

    return EnergyTimeline(meter, rate_hz=rate_hz, on_reading=on_reading)
