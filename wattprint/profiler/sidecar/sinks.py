"""The consumers of the sidecar's results, each with one method, the way vLLM's stat loggers consume
one set of stats.

A result sink implements ``record(result)``; the attributor driver computes each settled request once
and hands it to every sink through :class:`Sinks`. Sinks that only touch memory (the recent-results
store, the histograms) are handed results under the sidecar's lock, together with the attributor's
state, so that a scrape or a lookup never sees a request that is neither in flight nor stored; sinks
that do I/O (``blocking = True``: the ledger) get them after the lock is released.

A step observer implements ``observe_step(record, geometry)`` and sees every step the attributor
accepted (the id aliases, the simulated meter's load). The in-memory classes here are not thread-safe:
the sidecar serialises them with its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from wattprint.exporters.histograms import (
    ENERGY_PER_TOKEN_BUCKETS_J,
    REQUEST_ENERGY_BUCKETS_J,
    HistogramState,
)
from wattprint.exporters.ledger import Ledger
from wattprint.profiler.core.costmodel import ModelGeometry, kv_read_bytes, kv_write_bytes, request_flops
from wattprint.profiler.core.records import StepRecord
from wattprint.profiler.core.results import RequestResult
from wattprint.profiler.core.strata import normalize
from wattprint.profiler.vllm.ids import request_aliases

_MAX_IDS_PER_ALIAS = 256


class ResultSink(Protocol):
    #: where its failures are counted (``wattprint_internal_errors_total{where}``)
    where: str
    #: True for a sink doing I/O: handed results outside the sidecar's lock
    blocking: bool

    def record(self, result: RequestResult) -> None: ...


class StepObserver(Protocol):
    #: where its failures are counted
    where: str

    def observe_step(self, record: StepRecord, geometry: ModelGeometry) -> None: ...


class Sinks:
    """The result sinks, and the one loop that hands each result to each of them."""

    def __init__(self, fail: Callable[..., None], sinks: Iterable[ResultSink] = ()):
        self._fail = fail
        self._sinks: list[ResultSink] = list(sinks)

    def add(self, sink: ResultSink) -> None:
        self._sinks.append(sink)

    def deliver(self, results: list[RequestResult], *, blocking: bool) -> None:
        """Hand ``results`` to the sinks with ``sink.blocking == blocking``; a sink's failure is counted
        and does not stop the others."""
        sinks = [s for s in self._sinks if s.blocking == blocking]
        for res in results:
            for sink in sinks:
                try:
                    sink.record(res)
                except Exception:  # noqa: BLE001
                    self._fail(sink.where, "%s failed on request %s", type(sink).__name__, res.id)


def combine_results(rid: str, parts: list[RequestResult]) -> RequestResult:
    """One result for a client id that maps to several engine requests (several prompts, n > 1)."""
    starts = [p.t_start for p in parts if p.t_start is not None]
    ends = [p.t_end for p in parts if p.t_end is not None]
    return RequestResult(
        id=rid,
        energy_j=sum(p.energy_j for p in parts),
        prefill_j=sum(p.prefill_j for p in parts),
        decode_j=sum(p.decode_j for p in parts),
        kv_j=sum(p.kv_j for p in parts),
        kv_read_bytes=sum(p.kv_read_bytes for p in parts),
        kv_write_bytes=sum(p.kv_write_bytes for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        output_tokens=sum(p.output_tokens for p in parts),
        flops=sum(p.flops for p in parts),
        stratum=parts[0].stratum,
        source=parts[0].source,
        t_start=min(starts) if starts else None,
        t_end=max(ends) if ends else None,
        model=parts[0].model,
        status="final" if all(p.status == "final" for p in parts) else "provisional",
    )


class RecentResults:
    """The last ``capacity`` results by engine id, and the client-visible ids (OpenAI response ids) each
    engine id answers to, for ``/v1/requests/{id}``."""

    where = "results"
    blocking = False

    def __init__(self, capacity: int = 20_000, alias_capacity: int = 100_000):
        self.capacity = max(1, capacity)
        self.alias_capacity = max(1, alias_capacity)
        self._recent: OrderedDict[str, RequestResult] = OrderedDict()
        self._aliases: OrderedDict[str, list[str]] = OrderedDict()

    def record(self, result: RequestResult) -> None:
        self._recent[result.id] = result
        self._recent.move_to_end(result.id)
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)

    def observe_step(self, record: StepRecord, geometry: ModelGeometry) -> None:
        for r in record.requests:
            for alias in request_aliases(r.id):
                ids = self._aliases.get(alias)
                if ids is None:
                    self._aliases[alias] = [r.id]
                    if len(self._aliases) > self.alias_capacity:
                        self._aliases.popitem(last=False)
                elif r.id not in ids and len(ids) < _MAX_IDS_PER_ALIAS:
                    ids.append(r.id)

    def lookup(self, rid: str, in_flight: Callable[[str], RequestResult | None]) -> RequestResult | None:
        """A request's result by engine id or client id, stored or (``in_flight``) provisional; a client
        id that maps to several engine requests gets their sum; None if unknown."""

        def exact(i: str) -> RequestResult | None:
            res = self._recent.get(i)
            return res if res is not None else in_flight(i)

        res = exact(rid)
        if res is not None:
            return res
        parts = [p for p in (exact(e) for e in self._aliases.get(rid, ())) if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else combine_results(rid, parts)


class RequestHistograms:
    """Final requests counted and their energy (and energy per output token) in histograms with
    request-id exemplars, per (model, stratum). Results not final (cut short) are not counted."""

    where = "results"
    blocking = False

    def __init__(self, clock: Callable[[], float | None] = time.time):
        self.clock = clock  # exemplar timestamps
        self.requests: dict[tuple[str, str], int] = {}
        self.energy: dict[tuple[str, str], HistogramState] = {}
        self.per_token: dict[tuple[str, str], HistogramState] = {}

    def record(self, result: RequestResult) -> None:
        if result.status != "final":
            return
        key = (result.model or "", normalize(result.stratum))
        self.requests[key] = self.requests.get(key, 0) + 1
        ts = self.clock()
        hist = self.energy.get(key)
        if hist is None:
            hist = self.energy[key] = HistogramState(REQUEST_ENERGY_BUCKETS_J)
        hist.observe(result.energy_j, result.id, ts)
        if result.output_tokens:
            hist = self.per_token.get(key)
            if hist is None:
                hist = self.per_token[key] = HistogramState(ENERGY_PER_TOKEN_BUCKETS_J)
            hist.observe(result.energy_j / result.output_tokens, result.id, ts)

    def copy(self) -> tuple[dict, dict, dict]:
        """(request counts, energy histograms, energy-per-token histograms), copied."""
        return (dict(self.requests), {k: h.copy() for k, h in self.energy.items()},
                {k: h.copy() for k, h in self.per_token.items()})


class LedgerSink:
    """Appends every result to the request ledger (the ledger skips final ids it already holds)."""

    where = "ledger"
    blocking = True

    def __init__(self, ledger: Ledger, source: str):
        self.ledger = ledger
        self.source = source

    def record(self, result: RequestResult) -> None:
        self.ledger.append(result, model=result.model, source=result.source or self.source)


class SimulatedLoad:
    """With the simulated meter, reports each step's cost-model activity so that its power follows the load."""

    where = "simulated_meter"

    def __init__(self, observe: Callable[[float, float, float, float], None]):
        self.observe = observe

    def observe_step(self, record: StepRecord, geometry: ModelGeometry) -> None:
        reqs = record.requests
        new = sum(r.prefill_tokens + r.decode_tokens for r in reqs)
        if new <= 0:
            return
        flops = sum(float(request_flops(geometry, r.prefill_tokens + r.decode_tokens, r.context_tokens))
                    for r in reqs)
        kv = sum(float(kv_read_bytes(geometry, r.context_tokens) + kv_write_bytes(geometry, r.prefill_tokens
                                                                                   + r.decode_tokens))
                 for r in reqs)
        self.observe(record.t_start, record.t_end, flops, kv + geometry.weight_bytes)
