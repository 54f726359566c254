"""The columnar form of a ``steps.jsonl`` line (``docs/formats.md``): a step's requests as one list per
field, ``"requests": {"id": [...], "prefill_tokens": [...], ...}``, rather than one object per request.
It is what wattprint writes (about a third of the bytes, and decoded without a Python object per
entry); the per-entry form is still read, even mixed line by line with this one, to the same records.

This module is the format's own logic and knows no record: the structs a line's columns decode into
(:class:`RequestColumns`; :class:`RawColumns`, the column reader's, with the lists that rarely change
left raw), the check that a step's lists have one value per request, the entries' values and columns they
give, and what a writer puts in them. :mod:`wattprint.profiler.core.records` reads and writes lines with
it; :mod:`wattprint.profiler.core.parallel` reads them into columns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import chain, compress, count, repeat
from operator import attrgetter, is_not

import msgspec
import numpy as np

from wattprint.profiler.core.validate import clamp

REQUIRED = ("id", "prefill_tokens", "decode_tokens", "context_tokens")
OPTIONAL = ("stratum", "prompt_tokens", "finished", "output_tokens")
DEFAULTS = (None, None, False, None)  # what an optional field is when not given
META = ("stratum", "prompt_tokens", "output_tokens")  # what the request-metadata rule reads


class RequestColumns(msgspec.Struct, omit_defaults=True, gc=False):
    """One step's requests as columns: request ``k`` is element ``k`` of every list. An optional list
    is absent when no request gives the field, else has one value per request (null: not given)."""

    id: list[str]
    prefill_tokens: list[int]
    decode_tokens: list[int]
    context_tokens: list[int]
    stratum: list[str | None] | None = None
    prompt_tokens: list[int | None] | None = None
    finished: list[bool | None] | None = None
    output_tokens: list[int | None] | None = None


_get = {name: attrgetter(name) for name in REQUIRED + OPTIONAL}


def bad_lengths(cols: Sequence[RequestColumns | RawColumns], lens: np.ndarray,
                known: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The steps whose lists do not all have ``lens`` values (their number of requests); ``known``: the
    lengths of lists already counted (those read raw)."""
    known = known or {}
    bad = np.zeros(len(cols), bool)
    for name in REQUIRED[1:]:
        got = known.get(name)
        bad |= (np.fromiter(map(len, map(_get[name], cols)), np.int64, len(cols)) if got is None else got) != lens
    for name in OPTIONAL:
        given = list(compress(range(len(cols)), map(is_not, map(_get[name], cols), repeat(None))))
        if given:
            got = np.fromiter(map(len, map(_get[name], map(cols.__getitem__, given))), np.int64, len(given))
            bad[np.asarray(given)[got != lens[given]]] = True
    return bad


def length_problem(cols: Sequence[RequestColumns]) -> tuple[int, str] | None:
    """The first step whose lists do not all have one value per request (its index, the reason)."""
    bad = bad_lengths(cols, np.fromiter(map(len, map(_get["id"], cols)), np.int64, len(cols)))
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    c = cols[i]
    name = next(f for f in REQUIRED + OPTIONAL if getattr(c, f) is not None and len(getattr(c, f)) != len(c.id))
    return i, f"requests field '{name}' has {len(getattr(c, name))} values for {len(c.id)} request ids"


def entry_fields(c: RequestColumns) -> tuple:
    """The per-entry values of one step's columns, in :class:`RequestEntry`'s field order (the record
    each request's values make; ``finished`` null is false)."""
    n = len(c.id)
    opt = [repeat(d, n) if (v := getattr(c, f)) is None else v for f, d in zip(OPTIONAL, DEFAULTS)]
    if c.finished is not None and None in c.finished:
        opt[2] = map(bool, c.finished)
    return (c.id, c.prefill_tokens, c.decode_tokens, c.context_tokens, *opt)


def of_entries(entries: Sequence) -> RequestColumns:
    """A step's entries (records with the fields above) as columns; optional lists only where some
    entry gives the field (the writer's side)."""
    cols = [list(map(_get[f], entries)) for f in REQUIRED]
    opt = {}
    for f, default in zip(OPTIONAL, DEFAULTS):
        values = list(map(_get[f], entries))
        if values.count(default) != len(values):
            opt[f] = values
    return RequestColumns(*cols, **opt)


class RawColumns(msgspec.Struct, gc=False):
    """:class:`RequestColumns` as the offline reader decodes them: the lists that change least from
    step to step (ids, prefill and decode counts: a decode batch changes rarely) left as their JSON text,
    compared with the step before's and decoded only where they changed."""

    id: msgspec.Raw
    prefill_tokens: msgspec.Raw
    decode_tokens: msgspec.Raw
    context_tokens: list[int]
    stratum: list[str | None] | None = None
    prompt_tokens: list[int | None] | None = None
    finished: list[bool | None] | None = None
    output_tokens: list[int | None] | None = None


_id_list, _int_list = msgspec.json.Decoder(list[str]), msgspec.json.Decoder(list[int])


def _by_change(raws, parse) -> tuple[np.ndarray, np.ndarray]:
    """``parse(raw)`` (an array) of each raw list, reused while a list is the one before; the arrays
    joined, and each one's length."""
    parts, last_raw, last = [], None, None
    for raw in raws:
        if raw != last_raw:
            last_raw, last = raw, parse(raw)
        parts.append(last)
    lens = np.fromiter(map(len, parts), np.int64, len(parts))
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), lens


def _ints(raw: msgspec.Raw) -> np.ndarray:
    values = _int_list.decode(raw)
    try:
        return np.array(values, np.int64) if values else np.zeros(0, np.int64)
    except OverflowError:  # a count beyond int64 (JSON ints are unbounded): clamped, still out of range
        return np.fromiter(map(clamp, values), np.int64, len(values))


def raw_columns(cols: Sequence[RawColumns]) -> tuple[np.ndarray, list[str], list[np.ndarray], np.ndarray] | None:
    """The entries of a run of steps as columns: each entry's request slot (numbered by first
    appearance), the slots' ids, the prefill, decode and context counts (int64; a count beyond int64
    clamped, still out of range) and the offsets of each step's entries. None: a list of the wrong
    type, or lists of unequal lengths in a step (the records path names the problem)."""
    interned: defaultdict[str, int] = defaultdict(count().__next__)
    lookup = interned.__getitem__
    try:
        slot, lens = _by_change(map(_get["id"], cols), lambda raw: np.fromiter(map(lookup, _id_list.decode(raw)),
                                                                                np.int64))
        (pre, pre_lens), (dec, dec_lens) = (_by_change(map(_get[f], cols), _ints) for f in REQUIRED[1:3])
    except msgspec.ValidationError:
        return None
    if bad_lengths(cols, lens, {"prefill_tokens": pre_lens, "decode_tokens": dec_lens}).any():
        return None
    offsets = np.zeros(len(cols) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    n = int(offsets[-1])
    try:
        ctx = np.fromiter(chain.from_iterable(map(_get["context_tokens"], cols)), np.int64, n)
    except OverflowError:
        ctx = np.fromiter(map(clamp, chain.from_iterable(map(_get["context_tokens"], cols))), np.int64, n)
    return slot, list(interned), [pre, dec, ctx], offsets


class ColumnMeta:
    """The optional fields the request-metadata rule reads (stratum, prompt length, output count) of a
    run of steps' entries, read from their columns: ``meta(idx)`` gives them for the entries ``idx``
    (None where not given), as :func:`records.entry_metadata` gives them of records."""

    def __init__(self, cols: Sequence[RequestColumns], offsets: np.ndarray):
        self.cols, self.offsets = cols, offsets
        self._flat: dict[str, list] = {}

    def __call__(self, idx: list[int]) -> tuple[list, list, list]:
        return tuple(self.field(name, idx) for name in META)

    def field(self, name: str, idx: list[int]) -> list:
        per_step = list(map(_get[name], self.cols))
        if per_step.count(None) == len(per_step):
            return [None] * len(idx)
        if name in self._flat or 8 * len(idx) > int(self.offsets[-1]):  # many: the whole column, once
            if name not in self._flat:
                lens = np.diff(self.offsets).tolist()
                self._flat[name] = list(chain.from_iterable(
                    repeat(None, k) if v is None else v for v, k in zip(per_step, lens)))
            return list(map(self._flat[name].__getitem__, idx))
        at = np.asarray(idx, dtype=np.int64)
        steps = np.searchsorted(self.offsets, at, side="right") - 1
        return [None if (v := per_step[s]) is None else v[k]
                for s, k in zip(steps.tolist(), (at - self.offsets[steps]).tolist())]

    def given(self, name: str, truthy: bool = False) -> list[int]:
        """The entries giving ``name`` (``truthy``: a true value), in order."""
        out: list[int] = []
        for v, start in zip(map(_get[name], self.cols), self.offsets[:-1].tolist()):
            if v is not None:
                out += compress(range(start, start + len(v)), v if truthy else map(is_not, v, repeat(None)))
        return out
