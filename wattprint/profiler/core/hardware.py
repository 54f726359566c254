"""Hardware profiles: the coefficients the cost model and the attribution start from.

A profile is a YAML mapping with the keys of :class:`HardwareProfile` (calibrated profiles may add
``energy_per_kv_byte_j`` and a ``fit`` section; any may set the fast tail after a busy step,
``power_tail_fraction`` and ``power_tail_tau_s``, else 10 % and 20 ms). ``load_profile`` accepts a path or the name of a
shipped profile (``h100-sxm``, ``h200``, ``a100-sxm``, ``l4``, ``cpu``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wattprint.configs import config_dir
from wattprint.errors import ConfigError
from wattprint.files import atomic_write

REQUIRED_KEYS = (
    "name",
    "tdp_w",
    "idle_power_w",
    "static_power_w",
    "energy_per_flop_j",
    "energy_per_byte_j",
    "peak_flops",
    "peak_bandwidth_bytes_s",
)
#: optional keys and the largest value each may take (their defaults: :class:`HardwareProfile`)
OPTIONAL_KEYS = {"power_tail_fraction": 1.0, "power_tail_tau_s": 1.0}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    tdp_w: float
    idle_power_w: float
    static_power_w: float
    energy_per_flop_j: float
    energy_per_byte_j: float
    peak_flops: float
    peak_bandwidth_bytes_s: float
    energy_per_kv_byte_j: float | None = None
    #: the fast tail after a busy step: this fraction of its dynamic power (above static) fades with
    #: time constant ``power_tail_tau_s`` in the gap after it; no ~100 ms counter resolves it, so the
    #: attribution takes both from the profile (estimates until measured on the board)
    power_tail_fraction: float = 0.10
    power_tail_tau_s: float = 0.020
    fit: dict = field(default_factory=dict)

    @property
    def kv_byte_j(self) -> float:
        """Energy per KV-cache byte: the calibrated figure, else energy per DRAM byte."""
        return self.energy_per_kv_byte_j if self.energy_per_kv_byte_j is not None else self.energy_per_byte_j

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in REQUIRED_KEYS}
        if self.energy_per_kv_byte_j is not None:
            out["energy_per_kv_byte_j"] = self.energy_per_kv_byte_j
        out["power_tail_fraction"] = self.power_tail_fraction
        out["power_tail_tau_s"] = self.power_tail_tau_s
        if self.fit:
            out["fit"] = self.fit
        return out


def shipped_profiles() -> dict[str, Path]:
    """Name -> path of every profile shipped in ``configs/hardware``."""
    return {p.stem: p for p in sorted((config_dir() / "hardware").glob("*.yaml"))}


def profile_from_dict(data: dict, origin: str = "<dict>") -> HardwareProfile:
    if not isinstance(data, dict):
        raise ConfigError("a hardware profile must be a YAML mapping", origin)
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ConfigError(f"hardware profile lacks {', '.join(missing)}", origin)
    values = {}
    for key in REQUIRED_KEYS[1:] + ("energy_per_kv_byte_j", *OPTIONAL_KEYS):
        if key not in data or (key == "energy_per_kv_byte_j" and data[key] is None):
            continue
        v = data[key]
        if isinstance(v, str):  # YAML 1.1 reads "9.89e14" (no dot, no exponent sign) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"hardware profile key {key!r} must be a non-negative number, got {v!r}", origin)
        values[key] = float(v)
    if values["tdp_w"] <= 0:
        raise ConfigError("hardware profile key 'tdp_w' must be positive", origin)
    for key, most in OPTIONAL_KEYS.items():
        if values.get(key, 0.0) > most:
            raise ConfigError(f"hardware profile key {key!r} must be at most {most:g}, got {values[key]!r}", origin)
    if values.get("power_tail_tau_s", 1.0) <= 0:
        raise ConfigError("hardware profile key 'power_tail_tau_s' must be positive", origin)
    fit = data.get("fit") or {}
    if not isinstance(fit, dict):
        raise ConfigError("hardware profile key 'fit' must be a mapping", origin)
    return HardwareProfile(name=str(data["name"]), fit=fit, **values)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """Load a profile from a YAML path, or by the name of a shipped one."""
    p = Path(name_or_path)
    if not p.exists():
        shipped = shipped_profiles()
        if str(name_or_path) in shipped:
            p = shipped[str(name_or_path)]
        else:
            raise ConfigError(
                f"no hardware profile file or shipped profile named {str(name_or_path)!r} "
                f"(shipped: {', '.join(shipped)})"
            )
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read hardware profile: {exc}", str(p)) from exc
    return profile_from_dict(data, str(p))


def save_profile(profile: HardwareProfile, path: str | Path, header: str = "") -> None:
    """Write a profile atomically: an interruption leaves no half-written file."""
    text = (header if header.endswith("\n") or not header else header + "\n") + yaml.safe_dump(
        profile.to_dict(), sort_keys=False
    )
    atomic_write(path, text.encode())
