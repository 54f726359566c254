"""What attribution produces: per-request breakdowns and window totals (the requests.jsonl and
summary.json schemas of ``docs/formats.md``)."""

from __future__ import annotations

import msgspec


class RequestResult(msgspec.Struct):
    """One request's energy. ``prefill_j + decode_j == energy_j`` (phases) and
    ``compute_j + weights_j + kv_j + static_j == energy_j`` (components, convention v2)."""

    id: str
    energy_j: float
    prefill_j: float
    decode_j: float
    kv_j: float
    kv_read_bytes: float
    kv_write_bytes: float
    prompt_tokens: int
    output_tokens: int
    flops: float
    stratum: str | None
    source: str
    t_start: float | None = None  # first step start (seconds, the steps' clock)
    t_end: float | None = None  # last step end
    model: str | None = None
    status: str = "final"  # "final", or "provisional" while the request is still running / not yet settled
    ideal_j: float | None = None  # its work's energy at the best operating point (core/efficiency.py)
    efficiency: float | None = None  # ideal_j / energy_j
    efficiency_class: str | None = None  # A-G (configs/efficiency.yaml, docs/efficiency.md)
    compute_j: float = 0.0  # v2 components: dynamic energy of the request's FLOPs,
    weights_j: float = 0.0  # of its share of reading the weights,
    static_j: float = 0.0  # and its share of the step's static power (kv_j: its KV traffic's own)
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache (part of prompt_tokens)

    @property
    def j_per_output_token(self) -> float | None:
        return self.energy_j / self.output_tokens if self.output_tokens else None

    def __post_init__(self):
        if self.efficiency is None and self.ideal_j is not None:
            from wattprint.profiler.core.efficiency import efficiency, efficiency_class

            self.efficiency = efficiency(self.ideal_j, self.energy_j)
            self.efficiency_class = efficiency_class(self.efficiency)


class Totals(msgspec.Struct):
    """Conservation at one instant: ``attributed_j + idle_j == measured_j + extrapolated_j``.

    ``extrapolated_j``: energy of steps after the counter's last change, predicted by the fitted model
    (given to requests, never counted as measured)."""

    measured_j: float
    attributed_j: float
    idle_j: float
    source: str
    t_start: float | None = None
    t_end: float | None = None
    prefill_j: float = 0.0
    decode_j: float = 0.0
    kv_j: float = 0.0
    requests: int = 0
    steps: int = 0
    device_measured_j: list[float] = msgspec.field(default_factory=list)
    coefficients: dict = msgspec.field(default_factory=dict)
    #: breakdowns of attributed_j, cumulative, keyed by raw stratum ("" when none was given)
    energy_j_by_phase_stratum: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    kv_j_by_stratum: dict[str, float] = msgspec.field(default_factory=dict)
    tokens_by_phase_stratum: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    kv_read_bytes: float = 0.0
    kv_write_bytes: float = 0.0
    extrapolated_j: float = 0.0
    compute_j: float = 0.0  # attributed energy by component (v2); kv_j is the fourth
    weights_j: float = 0.0
    static_j: float = 0.0
