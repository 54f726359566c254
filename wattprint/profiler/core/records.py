"""Record formats shared by every stage (documented in ``docs/formats.md``).

* ``steps.jsonl`` - one :class:`StepRecord` a line, its requests as columns (:func:`step_line`, the one
  writer; :mod:`wattprint.profiler.core.stepcolumns`) or, as older files have them, one object each.
* ``energy.jsonl`` - one :class:`EnergySample` a line: cumulative joules of one device.

Extra fields are allowed and ignored. Parsing is strict about types (an int field given a float or
a string is an error) and reports the file and the 1-based line of the first bad line.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import count
from operator import attrgetter
from pathlib import Path
from typing import Generic, TypeVar

import msgspec
import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.core import stepcolumns as columns
from wattprint.profiler.core import validate
from wattprint.profiler.core.stepcolumns import RequestColumns
from wattprint.profiler.core.validate import clamp


class RequestEntry(msgspec.Struct, omit_defaults=True, gc=False):
    """One request's part in one engine step."""

    id: str
    prefill_tokens: int
    decode_tokens: int
    context_tokens: int
    stratum: str | None = None
    #: prompt length (emitted by the vLLM hook; optional in files)
    prompt_tokens: int | None = None
    #: true on the request's last step (emitted by the vLLM hook; optional in files)
    finished: bool = False
    #: tokens the request has generated so far, as the engine counts them (the vLLM hook gives it on a
    #: request's last entry; optional in files)
    output_tokens: int | None = None


class StepRecord(msgspec.Struct, omit_defaults=True):
    """One engine step: its wall-clock span (seconds, the clock shared with energy.jsonl) and its requests."""

    step: int
    t_start: float
    t_end: float
    requests: list[RequestEntry]
    model: str | None = None


Columns = TypeVar("Columns")


class StepLine(msgspec.Struct, Generic[Columns], omit_defaults=True):
    """A steps.jsonl line as read or written: a :class:`StepRecord` whose requests may be ``Columns``
    (:class:`RequestColumns`; the column reader's raw variant)."""

    step: int
    t_start: float
    t_end: float
    requests: list[RequestEntry] | Columns
    model: str | None = None


class EnergySample(msgspec.Struct, gc=False):
    """A poll of one device's cumulative energy counter."""

    t: float
    device: int
    energy_j: float
    source: str | None = None


_get_id, _get_pre, _get_dec, _get_ctx = (attrgetter(f) for f in ("id", "prefill_tokens", "decode_tokens", "context_tokens"))
_get_t0, _get_t1, _get_step = attrgetter("t_start"), attrgetter("t_end"), attrgetter("step")
_step_decoder = msgspec.json.Decoder(StepLine[RequestColumns])
_get_requests = attrgetter("requests")
_energy_decoder = msgspec.json.Decoder(EnergySample)
_encoder = msgspec.json.Encoder()
CHUNK_BYTES = 2 << 20  # steps.jsonl is read this much at a time (~30 k entries of objects, ~90 k of columns)


def encode_line(obj) -> bytes:
    return _encoder.encode(obj) + b"\n"


def step_line(s: StepRecord) -> bytes:
    """THE writer of a steps.jsonl line: the step, its requests as columns."""
    return encode_line(StepLine(s.step, s.t_start, s.t_end, columns.of_entries(s.requests), s.model))


def as_records(lines: list[StepLine], path: str, data: bytes | None) -> list[StepRecord]:
    """Decoded lines as records (columns made entries); a step whose lists do not all have one value
    per request is refused naming its line of ``data``."""
    cols = [r for r in map(_get_requests, lines) if type(r) is RequestColumns]
    if cols and (problem := columns.length_problem(cols)):
        _fail(next(i for i, s in enumerate(lines) if s.requests is cols[problem[0]]), problem[1], path, data)
    with gc_paused():
        return [StepRecord(s.step, s.t_start, s.t_end, s.requests if type(s.requests) is list
                           else list(map(RequestEntry, *columns.entry_fields(s.requests))), s.model) for s in lines]


def is_parquet(path: str | Path) -> bool:
    """A Parquet file rather than JSON lines (by extension)."""
    return Path(path).suffix.lower() in (".parquet", ".pq")


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc


def _locate_bad_line(data: bytes, decoder: msgspec.json.Decoder, path: str) -> InputError:
    """Decode line by line to name the first bad line (only called once the fast path failed)."""
    for lineno, raw in enumerate(bytes(data).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            decoder.decode(raw)
        except msgspec.ValidationError as exc:
            return InputError(f"invalid record: {exc}", path, lineno)
        except msgspec.DecodeError as exc:
            return InputError(f"malformed JSON: {exc}", path, lineno)
    return InputError("malformed JSON lines", path)


@contextmanager
def gc_paused():
    """Pause the cyclic GC while millions of acyclic records are allocated (a large speed-up)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def decode_lines(data: bytes, decoder: msgspec.json.Decoder, path: str) -> list:
    try:
        with gc_paused():
            return decoder.decode_lines(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise _locate_bad_line(data, decoder, path) from None


def _line_numbers(data: bytes) -> list[int]:
    """1-based line number of each non-blank line (for error messages after the fast path)."""
    return [i for i, raw in enumerate(bytes(data).split(b"\n"), start=1) if raw.strip()]


@dataclass
class EntryArrays:
    """The request-step entries of a run of steps, as columns (extracted once, in C loops)."""

    reqs: list[RequestEntry] | None  # every entry, flattened in step order (None: read as columns)
    slot: np.ndarray  # entry -> request slot (order of first appearance)
    slot_ids: list[str]  # slot -> request id
    prefill: np.ndarray
    decode: np.ndarray
    context: np.ndarray
    offsets: np.ndarray  # entries of step i are offsets[i]:offsets[i+1]
    #: entries read as columns: indices -> (stratum, prompt_tokens, output_tokens) lists, None where not given
    meta: Callable[[list[int]], tuple[list, list, list]] | None = field(default=None, repr=False)

    def metadata(self, idx: list[int]) -> tuple[list, list, list]:
        """Stratum, prompt length and output count of the entries ``idx`` (None where not given)."""
        if self.reqs is None:
            return self.meta(idx) if self.meta is not None else ([None] * len(idx),) * 3
        return entry_metadata(self.reqs, idx)


def entry_metadata(reqs: list[RequestEntry], idx: list[int]) -> tuple[list, list, list]:
    """Stratum, prompt length and output count of the entries ``reqs[i]`` for ``i`` in ``idx``."""
    rs = list(map(reqs.__getitem__, idx))
    return [r.stratum for r in rs], [r.prompt_tokens for r in rs], [r.output_tokens for r in rs]


@dataclass
class StepTimes:
    """A run of steps as columns, without records (a columnar file read straight into arrays)."""

    step: np.ndarray  # float64 (exact below 2**53; validated against MAX_STEP)
    t_start: np.ndarray
    t_end: np.ndarray

    def __len__(self) -> int:
        return len(self.t_start)

    @classmethod
    def of(cls, steps: list[StepRecord]) -> StepTimes:
        n = len(steps)
        try:
            num = np.fromiter(map(_get_step, steps), float, n)
        except OverflowError:  # a step number beyond float range: clamped, still out of range
            num = np.fromiter(map(clamp, map(_get_step, steps)), float, n)
        return cls(num, np.fromiter(map(_get_t0, steps), float, n), np.fromiter(map(_get_t1, steps), float, n))

    def last(self) -> StepTimes:
        return StepTimes(self.step[-1:], self.t_start[-1:], self.t_end[-1:])


def entry_arrays(steps: list[StepRecord]) -> EntryArrays:
    """Extract the entries' columns. Every per-entry loop runs in C (``map``/``attrgetter``/``fromiter``;
    ids are interned by a ``defaultdict`` whose factory numbers new ids)."""
    offsets = np.zeros(len(steps) + 1, dtype=np.int64)
    np.cumsum([len(s.requests) for s in steps], out=offsets[1:])
    n = int(offsets[-1])
    with gc_paused():
        reqs = [r for s in steps for r in s.requests]
        interned: defaultdict[str, int] = defaultdict(count().__next__)
        slot = np.fromiter(map(interned.__getitem__, map(_get_id, reqs)), np.int64, n)
        try:
            cols = [np.fromiter(map(g, reqs), np.int64, n) for g in (_get_pre, _get_dec, _get_ctx)]
        except OverflowError:  # a count beyond int64 (JSON ints are unbounded): clamped, still out of range
            cols = [np.fromiter(map(clamp, map(g, reqs)), np.int64, n) for g in (_get_pre, _get_dec, _get_ctx)]
    return EntryArrays(reqs, slot, list(interned), cols[0], cols[1], cols[2], offsets)


@dataclass
class StepTrace:
    """A parsed, validated steps.jsonl: the records, their entries as columns, and where each came from."""

    steps: list[StepRecord]
    entries: EntryArrays
    path: str = "<steps>"
    data: bytes | None = field(default=None, repr=False)

    def line_of(self, i: int) -> int | None:
        if self.data is None:
            return None
        return _line_numbers(self.data)[i]


def validate_steps(steps: list[StepRecord], path: str, data: bytes | None = None,
                   entries: EntryArrays | None = None, *, prev: StepRecord | StepTimes | None = None) -> EntryArrays:
    """Check order and values (vectorised); raises :class:`InputError` naming the line of ``data``.
    ``prev``: the step before these (a file read in chunks)."""
    times = StepTimes.of(steps)
    if prev is not None and not isinstance(prev, StepTimes):
        prev = StepTimes.of([prev])
    check_times(times, path, data, prev)
    e = entries if entries is not None else entry_arrays(steps)
    check_entries(e, path, data)
    return e


def _fail(i: int, problem: str, path: str, data: bytes | None):
    lines = _line_numbers(data) if data is not None else None
    raise InputError(problem, path, lines[i] if lines else None)


def check_times(t: StepTimes, path: str, data: bytes | None, prev: StepTimes | None = None) -> None:
    """The step rule (:mod:`validate`) over a run of steps: times, numbers, order (``prev``: the step
    before them, from the previous chunk); the first bad step is named by its line of ``data``."""
    if not len(t):
        return
    shift = 0
    num, t0, t1 = t.step, t.t_start, t.t_end
    if prev is not None:  # checked against the previous chunk's last step
        num, t0, t1 = (np.concatenate([a, b]) for a, b in ((prev.step, num), (prev.t_start, t0), (prev.t_end, t1)))
        shift = 1
    bad = validate.times_bad(t0, t1)
    if bad.any():
        i = int(np.argmax(bad))
        _fail(i - shift, validate.explain_times(t0[i], t1[i]), path, data)
    bad = validate.numbers_bad(num)
    if bad.any():
        i = int(np.argmax(bad))
        _fail(i - shift, f"step number {int(num[i])} is out of range [0, {validate.MAX_STEP}]", path, data)
    if len(num) > 1:
        bad = validate.order_bad(num[:-1], t1[:-1], num[1:], t0[1:])
        if bad.any():
            i = int(np.argmax(bad)) + 1
            _fail(i - shift, validate.explain_order(int(num[i - 1]), t1[i - 1], int(num[i]), t0[i]), path, data)


def check_entries(e: EntryArrays, path: str, data: bytes | None) -> None:
    """The entry rule (:mod:`validate`) over a run of entries; names the line of the first bad one's step."""
    bad = validate.entries_bad(e.prefill, e.decode, e.context)
    if bad.any():
        j = int(np.argmax(bad))
        step = int(np.searchsorted(e.offsets, j, side="right")) - 1
        rid = e.slot_ids[int(e.slot[j])]
        _fail(step, validate.explain_entry(rid, int(e.prefill[j]), int(e.decode[j]), int(e.context[j])), path, data)


def load_steps(path: str | Path) -> StepTrace:
    """Parse and validate ``steps.jsonl``, keeping the entries as columns for the attribution."""
    data = read_bytes(path)
    steps = as_records(decode_lines(data, _step_decoder, str(path)), str(path), data)
    entries = validate_steps(steps, str(path), data)
    return StepTrace(steps, entries, str(path), data)


def iter_step_chunks(path: str | Path, chunk_bytes: int = CHUNK_BYTES,
                     convert: Callable | None = None) -> Iterator[tuple[list[StepRecord], EntryArrays]]:
    """Parse and validate ``steps.jsonl`` a chunk of whole lines at a time (bounded memory: only one
    chunk's records exist at once); order is checked across chunks, errors name the file's line.
    ``convert(data, path, prev)``: what a chunk gives instead of records (None: the records)."""
    path_s = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path_s) from exc
    prev, offset, rest, any_steps = None, 0, b"", False
    with f:
        while True:
            block = f.read(chunk_bytes)
            data = rest + block if rest else block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            rest = data[cut:]
            data = memoryview(data)[:cut]  # whole lines, not copied
            steps, entries = decode_chunk(data, path_s, prev, partial(_lines_before, path, offset), convert)
            if len(steps):
                any_steps = True
                prev = steps.last() if isinstance(steps, StepTimes) else steps[-1]
                yield steps, entries
            offset += len(data)
            if not block:
                break
    if not any_steps:
        raise InputError("no steps", path_s)


def decode_chunk(data: bytes | memoryview, path: str, prev: StepRecord | StepTimes | None,
                 lines_before: Callable[[], int], convert: Callable | None = None) -> tuple[list[StepRecord], EntryArrays | None]:
    """Decode and validate a chunk of whole lines of ``path`` (``prev``: the step before it); an error
    names the file's line, ``lines_before()`` counting the lines before the chunk."""
    try:
        with gc_paused():  # and the decoded lines freed before the collector could traverse them
            out = convert(data, path, prev) if convert is not None and data else None
            if out is None:
                lines = decode_lines(data, _step_decoder, path) if data else []
                steps = as_records(lines, path, data)
                out = steps, validate_steps(steps, path, data, prev=prev) if steps else None
                del lines, steps
        return out
    except InputError as exc:
        if exc.line is None:
            raise
        raise InputError(exc.reason, path, exc.line + lines_before()) from None


def _lines_before(path: str | Path, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n")


def read_steps(path: str | Path) -> list[StepRecord]:
    """Parse and validate ``steps.jsonl``."""
    return load_steps(path).steps


def read_energy(path: str | Path) -> list[EnergySample]:
    """Parse and validate ``energy.jsonl``."""
    data = read_bytes(path)
    samples = decode_lines(data, _energy_decoder, str(path))
    lines = None
    last_t: dict[int, float] = {}
    for i, s in enumerate(samples):
        problem = None
        if not (math.isfinite(s.t) and math.isfinite(s.energy_j)):
            problem = "t and energy_j must be finite numbers"
        elif s.device < 0:
            problem = f"device must be >= 0, got {s.device}"
        elif s.t < last_t.get(s.device, -math.inf):
            problem = f"samples of device {s.device} out of time order"
        if problem:
            lines = _line_numbers(data)
            raise InputError(problem, str(path), lines[i])
        last_t[s.device] = s.t
    if not samples:
        raise InputError("no energy samples", str(path))
    return samples
