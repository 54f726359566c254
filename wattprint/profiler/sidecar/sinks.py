"""The consumers of the sidecar's results, each with one method, the way vLLM's stat loggers consume
one set of stats.

A result sink implements ``record(result)``; the attributor driver computes each settled request once
and hands it to every sink through :class:`Sinks`. Sinks that only touch memory (the recent-results
store, the histograms) are handed results under the sidecar's lock, together with the attributor's
state, so that a scrape or a lookup never sees a request that is neither in flight nor stored; sinks
that do I/O (``blocking = True``: the ledger) get them after the lock is released.

A step observer implements ``observe_step(record, geometry)`` and sees every step the attributor
accepted (the simulated meter's load); the recent-results store learns each request's names once, when
it first appears. The in-memory classes here are not thread-safe:
the sidecar serialises them with its lock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec

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
from wattprint.profiler.sidecar.access import MAX_REF_CHARS
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


class EngineResult(RequestResult):
    """A request's result as the sidecar keeps it: with the engine session it ran in (records are keyed by
    engine and the engine's own request id) and, for an ``incomplete`` one, what is missing (``start``:
    its first steps never arrived; ``steps``: records were lost while it ran)."""

    engine: str = ""
    missing: str | None = None

    @classmethod
    def of(cls, res: RequestResult, *, engine: str, model: str | None, status: str,
           missing: str | None) -> EngineResult:
        d = msgspec.structs.asdict(res)
        d.update(engine=engine, status=status, missing=missing)
        if model is not None:
            d["model"] = model
        return cls(**d)


def combine_results(rid: str, parts: list[RequestResult]) -> RequestResult:
    """One result for a client id that maps to several engine requests (several prompts, n > 1)."""
    starts = [p.t_start for p in parts if p.t_start is not None]
    ends = [p.t_end for p in parts if p.t_end is not None]
    statuses = {p.status for p in parts}
    missing = sorted({m for p in parts if (m := getattr(p, "missing", None))})
    return EngineResult(
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
        status=statuses.pop() if len(statuses) == 1 else ("incomplete" if "incomplete" in statuses else "provisional"),
        compute_j=sum(p.compute_j for p in parts),
        weights_j=sum(p.weights_j for p in parts),
        static_j=sum(p.static_j for p in parts),
        cached_prompt_tokens=sum(p.cached_prompt_tokens for p in parts),
        engine=getattr(parts[0], "engine", ""),
        missing=",".join(missing) or None,
    )


def _bounded_add(index: OrderedDict, name: str, key, capacity: int) -> None:
    keys = index.get(name)
    if keys is None:
        index[name] = [key]
        if len(index) > capacity:
            index.popitem(last=False)
    elif key not in keys and len(keys) < _MAX_IDS_PER_ALIAS:
        keys.append(key)


Key = tuple  # (engine session, engine request id)


class RecentResults:
    """The last ``capacity`` results by (engine, engine request id); the names each record answers to
    (its engine id and the OpenAI response ids it maps to, for operators), the middleware's reference
    of each request (for the per-request URL) and the exemplar pseudonym of each stored record.

    Names are learnt once per request, when it first appears (:meth:`note_new`)."""

    where = "results"
    blocking = False

    def __init__(self, capacity: int = 20_000, alias_capacity: int = 100_000,
                 pseudonym: Callable[[str], str] | None = None):
        self.capacity = max(1, capacity)
        self.alias_capacity = max(1, alias_capacity)
        self.pseudonym = pseudonym
        self._recent: OrderedDict[Key, RequestResult] = OrderedDict()
        self._aliases: OrderedDict[str, list[Key]] = OrderedDict()
        self._refs: OrderedDict[str, list[Key]] = OrderedDict()
        self._pseudonyms: OrderedDict[str, Key] = OrderedDict()

    def record(self, result: RequestResult) -> None:
        key = (getattr(result, "engine", ""), result.id)
        self._recent[key] = result
        self._recent.move_to_end(key)
        while len(self._recent) > self.capacity:
            self._recent.popitem(last=False)
        if self.pseudonym is not None:
            self._pseudonyms[self.pseudonym(record_name(result))] = key
            while len(self._pseudonyms) > self.capacity:
                self._pseudonyms.popitem(last=False)

    def note_new(self, engine: str, entries) -> None:
        """Requests of ``engine`` seen for the first time: learn their names and references."""
        for e in entries:
            key = (engine, e.id)
            for name in (e.id, *request_aliases(e.id)):
                _bounded_add(self._aliases, name, key, self.alias_capacity)
            ref = getattr(e, "ref", None)
            if ref:
                _bounded_add(self._refs, ref[:MAX_REF_CHARS], key, self.alias_capacity)

    def _get(self, key: Key, in_flight: Callable[[str, str], RequestResult | None]) -> RequestResult | None:
        res = self._recent.get(key)
        return res if res is not None else in_flight(*key)

    def _combined(self, name: str, keys, in_flight) -> RequestResult | None:
        parts = [p for p in (self._get(k, in_flight) for k in keys) if p is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else combine_results(name, parts)

    def lookup(self, rid: str, in_flight: Callable[[str, str], RequestResult | None]) -> RequestResult | None:
        """(Operators) a record by engine id, response id or exemplar pseudonym; several engine requests
        answering to one name are summed; None if unknown."""
        key = self._pseudonyms.get(rid)
        if key is not None:
            return self._get(key, in_flight)
        return self._combined(rid, self._aliases.get(rid, ()), in_flight)

    def lookup_ref(self, ref: str, response_id: str,
                   in_flight: Callable[[str, str], RequestResult | None]) -> RequestResult | None:
        """(Clients) the records of the one request the middleware gave reference ``ref``."""
        keys = [k for k in self._refs.get(ref, ()) if k[1] == response_id or response_id in request_aliases(k[1])]
        return self._combined(response_id, keys, in_flight)


def record_name(result: RequestResult) -> str:
    return f"{getattr(result, 'engine', '')}/{result.id}"


class RequestHistograms:
    """Final requests counted and their energy (and energy per output token) in histograms with
    exemplars, per (model, stratum). Results not final (cut short, incomplete) are not counted. The
    exemplar of a request is ``exemplar(result)``: by default its id; the sidecar gives the record's
    pseudonym (:func:`wattprint.profiler.sidecar.access.pseudonym`)."""

    where = "results"
    blocking = False

    def __init__(self, clock: Callable[[], float | None] = time.time,
                 exemplar: Callable[[RequestResult], str] | None = None):
        self.clock = clock  # exemplar timestamps
        self.exemplar = exemplar or (lambda r: r.id)
        self.requests: dict[tuple[str, str], int] = {}
        self.energy: dict[tuple[str, str], HistogramState] = {}
        self.per_token: dict[tuple[str, str], HistogramState] = {}

    def record(self, result: RequestResult) -> None:
        if result.status != "final":
            return
        key = (result.model or "", normalize(result.stratum))
        self.requests[key] = self.requests.get(key, 0) + 1
        ts = self.clock()
        ex = self.exemplar(result)
        hist = self.energy.get(key)
        if hist is None:
            hist = self.energy[key] = HistogramState(REQUEST_ENERGY_BUCKETS_J)
        hist.observe(result.energy_j, ex, ts)
        if result.output_tokens:
            hist = self.per_token.get(key)
            if hist is None:
                hist = self.per_token[key] = HistogramState(ENERGY_PER_TOKEN_BUCKETS_J)
            hist.observe(result.energy_j / result.output_tokens, ex, ts)

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
