"""A policy file (``configs/policy.yaml`` is the commented example): parsed and validated whole.

Every mistake is a :class:`~wattprint.errors.ConfigError` naming ``FILE:LINE``. Strata are those of
``configs/strata.yaml`` plus ``unclassified``; a stratum the file does not list has no conditions
(priority 0, no budget, no minimum class).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import yaml

from wattprint.errors import ConfigError
from wattprint.profiler.core.efficiency import bands
from wattprint.profiler.core.strata import UNCLASSIFIED, known_strata
from wattprint.profiler.policy.keys import KeyMap, parse_key

ON_BREACH = ("observe", "deprioritize", "reject")
MAX_POLICY_BYTES = 8 << 20
#: vLLM's priority is a plain int; keep it within 32 bits (lower = served earlier)
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
_TOP = {"version", "default_stratum", "claimable", "deprioritize_by", "strata", "api_keys"}
_RULE = {"priority", "min_class", "budget_j", "budget_window_s", "on_breach"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class StratumRule:
    """One stratum's access conditions. ``budget_j`` per rolling ``budget_window_s``; ``min_class``: the
    worst efficiency class its recent requests may reach; ``on_breach``: what happens past either."""

    stratum: str
    priority: int = 0
    min_class: str | None = None
    budget_j: float | None = None
    budget_window_s: float | None = None
    on_breach: str = "observe"

    @property
    def conditioned(self) -> bool:
        return self.budget_j is not None or self.min_class is not None

    @property
    def window_s(self) -> float | None:
        """The rolling window that the budget and the class are judged over."""
        return self.budget_window_s


@dataclass(frozen=True)
class Policy:
    rules: Mapping[str, StratumRule]
    keys: KeyMap
    deprioritize_by: int = 100
    path: str = "<policy>"
    strata: tuple[str, ...] = field(default=())

    def rule(self, stratum: str) -> StratumRule:
        return self.rules.get(stratum) or self.rules[UNCLASSIFIED]


def all_strata() -> tuple[str, ...]:
    return (*known_strata(), UNCLASSIFIED)


class _Doc:
    """The parsed document and its node tree, to name the line of any value."""

    def __init__(self, text: str, path: str):
        self.path = path
        try:
            self.node = yaml.compose(text, Loader=_Loader)
            self.data = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(f"not valid YAML: {getattr(exc, 'problem', None) or exc}", path,
                              mark.line + 1 if mark is not None else None) from None

    def line(self, *keys) -> int | None:
        """The line of the value at ``keys`` (of the nearest mapping holding it when it is missing)."""
        node = self.node
        if node is None:
            return None
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                break
            found = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not found:
                break
            node = found[0]
        return node.start_mark.line + 1

    def error(self, message: str, *keys) -> ConfigError:
        return ConfigError(message, self.path, self.line(*keys))


def _number(doc: _Doc, value, keys, *, integer=False, positive=False, lo=None, hi=None):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value):
        raise doc.error(f"{keys[-1]} must be {'an integer' if integer else 'a finite number'}, got {value!r}", *keys)
    if positive and not value > 0:
        raise doc.error(f"{keys[-1]} must be > 0, got {value!r}", *keys)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise doc.error(f"{keys[-1]} must be within [{lo}, {hi}], got {value!r}", *keys)
    return value


def _stratum(doc: _Doc, value, keys) -> str:
    if not isinstance(value, str) or value not in all_strata():
        raise doc.error(f"unknown stratum {str(value)[:64]!r}; strata are {', '.join(all_strata())}", *keys)
    return value


def _rule(doc: _Doc, name: str, spec) -> StratumRule:
    keys = ("strata", name)
    if spec is None:
        return StratumRule(name)
    if not isinstance(spec, dict):
        raise doc.error(f"stratum {name}: expected a mapping of {', '.join(sorted(_RULE))}", *keys)
    extra = sorted(str(k) for k in spec if k not in _RULE)
    if extra:
        raise doc.error(f"stratum {name}: unknown setting {extra[0][:64]!r}", *keys, extra[0])
    priority = _number(doc, spec.get("priority", 0), (*keys, "priority"), integer=True,
                       lo=PRIORITY_RANGE[0], hi=PRIORITY_RANGE[1])
    min_class = spec.get("min_class")
    classes = [c for c, _ in bands()]
    if min_class is not None and min_class not in classes:
        raise doc.error(f"min_class must be one of {', '.join(classes)}, got {str(min_class)[:16]!r}",
                        *keys, "min_class")
    budget = spec.get("budget_j")
    window = spec.get("budget_window_s")
    if budget is not None:
        budget = float(_number(doc, budget, (*keys, "budget_j"), positive=True))
    if window is not None:
        window = float(_number(doc, window, (*keys, "budget_window_s"), positive=True, hi=366 * 86400))
    if budget is not None and window is None:
        raise doc.error(f"stratum {name}: budget_j needs budget_window_s (the rolling window, seconds)", *keys)
    if min_class is not None and window is None:
        raise doc.error(f"stratum {name}: min_class needs budget_window_s (the window the class is judged over)",
                        *keys)
    on_breach = spec.get("on_breach", "observe")
    if on_breach not in ON_BREACH:
        raise doc.error(f"on_breach must be one of {', '.join(ON_BREACH)}, got {str(on_breach)[:32]!r}",
                        *keys, "on_breach")
    return StratumRule(name, int(priority), min_class, budget, window, on_breach)


def _key_entries(doc: _Doc, raw) -> dict[bytes, tuple[str, ...]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise doc.error("api_keys must map keys to a stratum or a list of strata", "api_keys")
    out: dict[bytes, tuple[str, ...]] = {}
    for entry, strata in raw.items():
        keys = ("api_keys", entry)
        if not isinstance(entry, str):
            raise doc.error("an API key must be a string", *keys)
        try:
            digest = parse_key(entry)
        except ValueError as exc:
            raise doc.error(str(exc), *keys) from None
        values = [strata] if isinstance(strata, str) else strata
        if not isinstance(values, list) or not values:
            raise doc.error("an API key maps to a stratum or a non-empty list of strata", *keys)
        if digest in out:
            raise doc.error("the same API key is listed twice", *keys)
        out[digest] = tuple(dict.fromkeys(_stratum(doc, v, keys) for v in values))
    return out


def parse_policy(text: str, path: str = "<policy>") -> Policy:
    """A policy from YAML text; raises ConfigError naming ``path:LINE``."""
    doc = _Doc(text, path)
    data = doc.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise doc.error("a policy is a mapping (strata:, api_keys:, ...)")
    extra = sorted(str(k) for k in data if k not in _TOP)
    if extra:
        raise doc.error(f"unknown setting {extra[0][:64]!r} (expected {', '.join(sorted(_TOP))})", extra[0])
    if data.get("version", 1) != 1:
        raise doc.error(f"unsupported policy version {data.get('version')!r} (this wattprint reads 1)", "version")
    strata_spec = data.get("strata") or {}
    if not isinstance(strata_spec, dict):
        raise doc.error("strata must map a stratum to its conditions", "strata")
    rules = {name: StratumRule(name) for name in all_strata()}
    for name, spec in strata_spec.items():
        rules[_stratum(doc, name, ("strata", name))] = _rule(doc, name, spec)
    default = _stratum(doc, data.get("default_stratum", UNCLASSIFIED), ("default_stratum",))
    entries = _key_entries(doc, data.get("api_keys"))
    claimable_raw = data.get("claimable")
    if claimable_raw is None:  # without keys the header is trusted; with keys, only the default is free
        claimable = frozenset(all_strata()) if not entries else frozenset({default})
    elif isinstance(claimable_raw, list):
        claimable = frozenset(_stratum(doc, v, ("claimable",)) for v in claimable_raw) | {default}
    else:
        raise doc.error("claimable must be a list of strata", "claimable")
    by = _number(doc, data.get("deprioritize_by", 100), ("deprioritize_by",), integer=True, lo=0, hi=2**30)
    return Policy(MappingProxyType(rules), KeyMap(entries, claimable, default), int(by), path, all_strata())


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read policy: {exc.strerror or exc}", str(path)) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"policy larger than {MAX_POLICY_BYTES >> 20} MiB", str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("not UTF-8 text", str(path), line) from None
    return parse_policy(text, str(path))
