"""Usage strata: the bounded label values for ``stratum`` (``configs/strata.yaml``)."""

from __future__ import annotations

from functools import lru_cache

import yaml

from wattprint.configs import config_dir

UNCLASSIFIED = "unclassified"


@lru_cache(maxsize=1)
def known_strata() -> tuple[str, ...]:
    data = yaml.safe_load((config_dir() / "strata.yaml").read_text())
    return tuple(data["strata"])


def normalize(stratum: str | None) -> str:
    """The stratum as a bounded label value: a configured stratum, else ``unclassified``."""
    if stratum:
        s = str(stratum).strip().lower()
        if s in known_strata():
            return s
    return UNCLASSIFIED
