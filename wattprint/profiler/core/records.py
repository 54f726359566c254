"""Record formats shared by every stage (documented in ``docs/formats.md``).

* ``steps.jsonl`` - one :class:`StepRecord` a line.
* ``energy.jsonl`` - one :class:`EnergySample` a line: cumulative joules of one device.

Extra fields are allowed and ignored. Parsing is strict about types (an int field given a float or
a string is an error) and reports the file and the 1-based line of the first bad line.
"""

from __future__ import annotations

import gc
import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from operator import attrgetter
from pathlib import Path

import msgspec
import numpy as np

from wattprint.errors import InputError
from wattprint.profiler.core import validate


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


class EnergySample(msgspec.Struct, gc=False):
    """A poll of one device's cumulative energy counter."""

    t: float
    device: int
    energy_j: float
    source: str | None = None


_get_id, _get_pre, _get_dec, _get_ctx = (attrgetter(f) for f in ("id", "prefill_tokens", "decode_tokens", "context_tokens"))
_get_t0, _get_t1, _get_step = attrgetter("t_start"), attrgetter("t_end"), attrgetter("step")
_step_decoder = msgspec.json.Decoder(StepRecord)
_energy_decoder = msgspec.json.Decoder(EnergySample)
_encoder = msgspec.json.Encoder()


def encode_line(obj) -> bytes:
    return _encoder.encode(obj) + b"\n"


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc


def _locate_bad_line(data: bytes, decoder: msgspec.json.Decoder, path: str) -> InputError:
    """Decode line by line to name the first bad line (only called once the fast path failed)."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
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
    return [i for i, raw in enumerate(data.split(b"\n"), start=1) if raw.strip()]


@dataclass
class EntryArrays:
    """The request-step entries of a run of steps, as columns (extracted once, in C loops)."""

    reqs: list[RequestEntry]  # every entry, flattened in step order
    slot: np.ndarray  # entry -> request slot (order of first appearance)
    slot_ids: list[str]  # slot -> request id
    prefill: np.ndarray
    decode: np.ndarray
    context: np.ndarray
    offsets: np.ndarray  # entries of step i are offsets[i]:offsets[i+1]


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
        cols = [np.fromiter(map(g, reqs), np.int64, n) for g in (_get_pre, _get_dec, _get_ctx)]
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
                   entries: EntryArrays | None = None, *, prev: StepRecord | None = None) -> EntryArrays:
    """Check order and values (vectorised); raises :class:`InputError` naming the line of ``data``.
    ``prev``: the step before these (a file read in chunks)."""
    n = len(steps)
    shift = 0
    if prev is not None and steps:
        steps = [prev, *steps]  # checked against the previous chunk's last step, then dropped
        n += 1
        shift = 1

    def fail(i: int, problem: str):
        lines = _line_numbers(data) if data is not None else None
        raise InputError(problem, path, lines[i - shift] if lines else None)

    t0 = np.fromiter(map(_get_t0, steps), float, n)
    t1 = np.fromiter(map(_get_t1, steps), float, n)
    num = np.fromiter(map(_get_step, steps), float, n)
    bad = validate.times_bad(t0, t1)
    if bad.any():
        i = int(np.argmax(bad))
        fail(i, validate.explain_times(t0[i], t1[i]))
    bad = validate.numbers_bad(num)
    if bad.any():
        i = int(np.argmax(bad))
        fail(i, f"step number {int(num[i])} is out of range [0, {validate.MAX_STEP}]")
    if n > 1:
        bad = validate.order_bad(num[:-1], t1[:-1], num[1:], t0[1:])
        if bad.any():
            i = int(np.argmax(bad)) + 1
            fail(i, validate.explain_order(int(num[i - 1]), t1[i - 1], int(num[i]), t0[i]))
    steps = steps[shift:]
    shift = 0  # entry problems below index this chunk's own steps
    e = entries if entries is not None else entry_arrays(steps)
    bad = validate.entries_bad(e.prefill, e.decode, e.context)
    if bad.any():
        j = int(np.argmax(bad))
        step = int(np.searchsorted(e.offsets, j, side="right")) - 1
        fail(step, validate.explain_entry(e.reqs[j].id, int(e.prefill[j]), int(e.decode[j]), int(e.context[j])))
    return e


def load_steps(path: str | Path) -> StepTrace:
    """Parse and validate ``steps.jsonl``, keeping the entries as columns for the attribution."""
    data = read_bytes(path)
    steps = decode_lines(data, _step_decoder, str(path))
    entries = validate_steps(steps, str(path), data)
    return StepTrace(steps, entries, str(path), data)


def iter_step_chunks(path: str | Path, chunk_bytes: int = 8 << 20) -> Iterator[tuple[list[StepRecord], EntryArrays]]:
    """Parse and validate ``steps.jsonl`` a chunk of whole lines at a time (bounded memory: only one
    chunk's records exist at once); order is checked across chunks, errors name the file's line."""
    path_s = str(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path_s) from exc
    prev, offset, rest, any_steps = None, 0, b"", False
    with f:
        while True:
            block = f.read(chunk_bytes)
            data = rest + block
            rest = b""
            if block:
                cut = data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
            try:
                steps = decode_lines(data, _step_decoder, path_s) if data else []
                entries = validate_steps(steps, path_s, data, prev=prev) if steps else None
            except InputError as exc:  # name the file's line: count the lines before this chunk
                if exc.line is None:
                    raise
                raise InputError(exc.reason, path_s, exc.line + _lines_before(path, offset)) from None
            if steps:
                any_steps = True
                prev = steps[-1]
                yield steps, entries
            offset += len(data)
            if not block:
                break
    if not any_steps:
        raise InputError("no steps", path_s)


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
