"""Columnar trace files: Parquet copies of steps and energy (``docs/formats.md``, section "Parquet"), the
kinds of file wattprint reads, and readers that take either format by extension (requests and ledgers:
:mod:`wattprint.profiler.core.resultfiles`).

Readers return exactly what the JSON-lines readers of :mod:`wattprint.profiler.core.records` return (a
validated :class:`StepTrace`, a list of :class:`EnergySample`), built column by column; a bad file is
an :class:`InputError` naming ``FILE:ROW`` (1-based row of the Parquet table, where JSON lines name the
line). Each file records what it holds in its schema metadata (``wattprint.kind``).
:func:`iter_step_columns_parquet` reads steps straight into columns (no Python object per entry or
step), validated by the same rule, for the offline attribution.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wattprint.errors import InputError
from wattprint.profiler.core import records
from wattprint.profiler.core.columnar import (
    all_default,
    arrow_call,
    as_numpy,
    column,
    detect_kind_columns,
    int_list,
    is_parquet,
    one_chunk,
    parquet_file,
    pylist,
    read_table,
    row_lines,
    valid,
)
from wattprint.profiler.core.records import (
    EnergySample,
    EntryArrays,
    RequestEntry,
    StepRecord,
    StepTimes,
    StepTrace,
    check_entries,
    check_times,
    entry_arrays,
    gc_paused,
)

MAX_LINE_BYTES = 64 << 20  # the longest first line read to tell what a JSON-lines file holds

ENTRY_TYPE = pa.struct([("id", pa.string()), ("prefill_tokens", pa.int64()), ("decode_tokens", pa.int64()),
                        ("context_tokens", pa.int64()), ("stratum", pa.string()), ("prompt_tokens", pa.int64()),
                        ("finished", pa.bool_()), ("output_tokens", pa.int64())])
STEPS_SCHEMA = pa.schema([("step", pa.int64()), ("t_start", pa.float64()), ("t_end", pa.float64()),
                          ("requests", pa.list_(ENTRY_TYPE)), ("model", pa.string())])
ID_PATH = "requests.list.element.id"  # read as a dictionary: no string per entry
ENERGY_SCHEMA = pa.schema([("t", pa.float64()), ("device", pa.int64()), ("energy_j", pa.float64()),
                           ("source", pa.string())])


# ------------------------------------------------------------------------------------------- writing
def steps_table(steps: Sequence[StepRecord] | StepTrace) -> pa.Table:
    e = steps.entries if isinstance(steps, StepTrace) else entry_arrays(list(steps))
    steps = steps.steps if isinstance(steps, StepTrace) else list(steps)
    children = [pa.DictionaryArray.from_arrays(e.slot, e.slot_ids).cast(pa.string()),
                pa.array(e.prefill), pa.array(e.decode), pa.array(e.context)]
    children += [pa.array([getattr(r, name) for r in e.reqs], ENTRY_TYPE.field(name).type)
                 for name in ("stratum", "prompt_tokens", "finished", "output_tokens")]
    entries = pa.StructArray.from_arrays(children, fields=list(ENTRY_TYPE))
    cols = [pa.array([s.step for s in steps], pa.int64()), pa.array([s.t_start for s in steps], pa.float64()),
            pa.array([s.t_end for s in steps], pa.float64()),
            pa.ListArray.from_arrays(pa.array(e.offsets, pa.int32()), entries),
            pa.array([s.model for s in steps], pa.string())]
    return pa.Table.from_arrays(cols, schema=STEPS_SCHEMA)


def energy_table(samples: Sequence[EnergySample]) -> pa.Table:
    return pa.Table.from_arrays([pa.array([getattr(s, f) for s in samples], ENERGY_SCHEMA.field(f).type)
                                 for f in ENERGY_SCHEMA.names], schema=ENERGY_SCHEMA)


# ------------------------------------------------------------------------------------------- reading
def detect_kind(path: str | Path) -> str:
    """What a JSON-lines or Parquet file holds: ``steps``, ``energy``, ``requests`` or ``ledger``."""
    path_s = str(path)
    if is_parquet(path):
        return detect_kind_columns(arrow_call(lambda: pq.read_schema(path_s), path_s), path_s)
    try:
        with open(path_s, "rb") as f:
            lineno, line = 0, b""
            while not line.strip():  # the first non-blank line decides
                line, lineno = f.readline(MAX_LINE_BYTES), lineno + 1
                if not line:
                    raise InputError("empty file: nothing to tell what it holds", path_s)
                if len(line) >= MAX_LINE_BYTES:
                    raise InputError(f"line longer than {MAX_LINE_BYTES} bytes", path_s, lineno)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path_s) from exc
    try:
        first = json.loads(line)
    except ValueError as exc:
        raise InputError(f"malformed JSON: {exc}", path_s, lineno) from None
    if not isinstance(first, dict):
        raise InputError("not a JSON object", path_s, lineno)
    return detect_kind_columns(pa.schema([(k, pa.null()) for k in first]), path_s)


def _slots(fields: dict, path: str, offsets: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each entry's request slot and the slots' ids, in order of first appearance (as
    :func:`records.entry_arrays` numbers them)."""
    ids = fields.get("id")
    if ids is not None and pa.types.is_dictionary(ids.type) and pa.types.is_string(ids.type.value_type):
        if ids.null_count == 0:  # the file's dictionary, renumbered by first appearance (numpy only)
            codes, slot = _by_first_appearance(as_numpy(ids.indices).astype(np.int64), len(ids.dictionary))
            names = _strings_at(ids.dictionary, codes.tolist())
            if len(set(names)) == len(names):
                return slot, names
        fields = {**fields, "id": ids.cast(pa.string())}
    import pyarrow.compute as pc  # only here: its import costs ~0.08 s a process

    enc = pc.dictionary_encode(column(fields, "id", pa.string(), path, "request", offsets=offsets))
    return as_numpy(enc.indices).astype(np.int64), enc.dictionary.to_pylist()


def _by_first_appearance(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The codes (in ``[0, k)``) used, in order of first appearance, and each value's rank in that order."""
    n = len(codes)
    if k <= 4 * n:  # each code's first position: the last write wins (work in n + k)
        first = np.full(k, n)
        first[codes[::-1]] = np.arange(n)[::-1]
        used = np.flatnonzero(first < n)
        used = used[np.argsort(first[used], kind="stable")]
        rank = np.zeros(k, np.int64)
        rank[used] = np.arange(len(used))
        return used, rank[codes]
    # a dictionary far larger than this batch (another writer's row groups): sort the batch instead
    uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(uniq), np.int64)
    rank[order] = np.arange(len(uniq))
    return uniq[order], rank[inverse]


def _columns_from_table(table: pa.Table, path: str, prev: StepTimes | None) -> tuple[StepTimes, EntryArrays, list]:
    """Step and entry columns of a table of steps, validated (``prev``: the step before them), without a
    Python object per entry; and the optional columns (model; stratum, prompt, finished, output)."""
    n = table.num_rows
    cols = {name: one_chunk(table.column(name)) for name in table.schema.names}
    step = column(cols, "step", pa.int64(), path, "step")
    t0, t1 = (column(cols, c, pa.float64(), path, "step") for c in ("t_start", "t_end"))
    model = column(cols, "model", pa.string(), path, "step", required=False)
    lists = cols.get("requests")
    if lists is None or not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)) \
            or not pa.types.is_struct(lists.type.value_type):
        raise InputError("step column 'requests' is missing or not a list of structs", path)
    if lists.null_count:
        raise InputError("step field 'requests' is null", path, int(np.argmin(valid(lists))) + 1)
    offsets = as_numpy(lists.offsets).astype(np.int64)
    flat = lists.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))  # no list is null: flatten()
    offsets = offsets - offsets[0]  # without its kernel (which loads pyarrow.compute: ~0.08 s a process)
    if flat.null_count:
        i = int(np.argmin(valid(flat)))
        raise InputError("a request entry is null", path, int(np.searchsorted(offsets, i, side="right")))
    fields = {f.name: a for f, a in zip(flat.type, flat.flatten())}
    slot, slot_ids = _slots(fields, path, offsets)
    ints = [as_numpy(column(fields, c, pa.int64(), path, "request", offsets=offsets))
            for c in ("prefill_tokens", "decode_tokens", "context_tokens")]
    opt = [column(fields, c, ENTRY_TYPE.field(c).type, path, "request", required=False)
           for c in ("stratum", "prompt_tokens", "finished", "output_tokens")]
    times = StepTimes(as_numpy(step).astype(float), as_numpy(t0), as_numpy(t1))
    entries = EntryArrays(None, slot, slot_ids, *ints, offsets, meta=partial(_metadata, opt[0], opt[1], opt[3]))
    lines = row_lines(n)
    check_times(times, path, lines, prev)
    check_entries(entries, path, lines)
    return times, entries, [model, *opt]


def _metadata(stratum: pa.Array | None, prompt: pa.Array | None, output: pa.Array | None,
              idx: list[int]) -> tuple[list, list, list]:
    """The optional fields of the entries ``idx`` (None where not given), read from the columns' buffers
    (``pa.array`` of numpy would import pandas, and ``take`` costs a kernel launch each)."""
    return _strings_at(stratum, idx), _ints_at(prompt, idx), _ints_at(output, idx)


def _ints_at(arr: pa.Array | None, idx: list[int]) -> list:
    if arr is None or arr.null_count == len(arr):
        return [None] * len(idx)
    out = as_numpy(arr)[idx].astype(object)
    out[~valid(arr)[idx]] = None
    return out.tolist()


def _strings_at(arr: pa.Array | None, idx: list[int]) -> list:
    if arr is None or arr.null_count == len(arr):
        return [None] * len(idx)
    ok = valid(arr)[idx].tolist()
    offsets = np.frombuffer(arr.buffers()[1], np.int32, len(arr) + 1, arr.offset * 4)
    data = arr.buffers()[2].to_pybytes() if arr.buffers()[2] is not None else b""
    at = np.asarray(idx, dtype=np.int64)
    starts, ends = offsets[at].tolist(), offsets[at + 1].tolist()
    return [data[a:b].decode() if given else None for given, a, b in zip(ok, starts, ends)]


def _steps_from_table(table: pa.Table, path: str, prev: StepRecord | None) -> tuple[list[StepRecord], EntryArrays]:
    """Records and entry columns of a table of steps, validated (``prev``: the step before them)."""
    times, entries, (model, *opt) = _columns_from_table(table, path, None if prev is None else StepTimes.of([prev]))
    n, m = table.num_rows, len(entries.slot)
    opt = list(zip(opt, (None, None, False, None)))
    with gc_paused():
        while opt and all_default(*opt[-1]):  # trailing fields no entry gives stay at their defaults
            opt.pop()
        values = [np.array(entries.slot_ids, dtype=object)[entries.slot].tolist(),
                  *map(int_list, (entries.prefill, entries.decode, entries.context)),
                  *(pylist(arr, m, default) for arr, default in opt)]
        reqs = list(map(RequestEntry, *values))
        del values  # freed now, not traversed by the collection that follows the pause
        offsets = entries.offsets
        groups = list(map(reqs.__getitem__, map(slice, offsets[:-1].tolist(), offsets[1:].tolist())))
        steps = list(map(StepRecord, times.step.astype(np.int64).tolist(), times.t_start.tolist(),
                         times.t_end.tolist(), groups, pylist(model, n)))
    entries.reqs = reqs
    entries.meta = None
    return steps, entries


def load_steps_parquet(path: str | Path) -> StepTrace:
    """Read and validate a steps Parquet file: the :class:`StepTrace` :func:`records.load_steps`
    gives for the same steps (read a row group at a time, the groups' entries then joined)."""
    chunks = list(iter_steps_parquet(path, batch_steps=1 << 62, empty_ok=True))
    if len(chunks) == 1:
        return StepTrace(*chunks[0], str(path), None)
    steps, reqs = [], []
    index: dict[str, int] = {}  # ids numbered by first appearance over the whole file
    slots, offsets = [], [np.zeros(1, np.int64)]
    for part, e in chunks:
        steps += part
        reqs += e.reqs
        remap = np.fromiter((index.setdefault(i, len(index)) for i in e.slot_ids), np.int64, len(e.slot_ids))
        slots.append(remap[e.slot])
        offsets.append(e.offsets[1:] + offsets[-1][-1])
    cat = [np.concatenate([getattr(e, c) for _, e in chunks] or [np.zeros(0, np.int64)])
           for c in ("prefill", "decode", "context")]
    entries = EntryArrays(reqs, np.concatenate(slots or [np.zeros(0, np.int64)]), list(index), *cat,
                          np.concatenate(offsets))
    return StepTrace(steps, entries, str(path), None)


def iter_steps_parquet(path: str | Path, batch_steps: int = 1024,
                       empty_ok: bool = False) -> Iterator[tuple[list[StepRecord], EntryArrays]]:
    """A steps Parquet file ``batch_steps`` rows at a time (at most a row group; bounded memory), as
    :func:`records.iter_step_chunks` reads JSON lines; errors name the file's row."""
    yield from _iter_tables(path, batch_steps, empty_ok, _steps_from_table, lambda s: s[-1])


def _iter_tables(path: str | Path, batch_steps: int, empty_ok: bool, convert, last) -> Iterator[tuple]:
    """``convert(table, path, prev)`` over a steps file's rows, ``batch_steps`` at a time (``last``: what
    the next batch is checked against, of a converted batch)."""
    path = str(path)
    f = parquet_file(path, (ID_PATH,))
    if (held := detect_kind_columns(f.schema_arrow, path)) != "steps":
        raise InputError(f"holds {held} records, not steps", path)
    prev, row0 = None, 0
    with f:
        for group in range(f.num_row_groups):  # a group at a time (one dictionary each), sliced
            table = arrow_call(lambda g=group: f.read_row_group(g), path)
            for start in range(0, table.num_rows, batch_steps):
                try:
                    out = convert(table.slice(start, batch_steps), path, prev)
                except InputError as exc:
                    if exc.line is None:
                        raise
                    raise InputError(exc.reason, path, exc.line + row0 + start) from None
                if len(out[0]):
                    prev = last(out[0])
                    yield out
            row0 += table.num_rows
    if row0 == 0 and not empty_ok:
        raise InputError("no steps", path)


def iter_step_columns_parquet(path: str | Path, batch_steps: int = 1024) -> Iterator[tuple[StepTimes, EntryArrays]]:
    """A steps Parquet file as columns, ``batch_steps`` rows at a time (at most a row group; bounded
    memory), validated as :func:`iter_steps_parquet` validates it, but with no Python object per entry
    or step: what the offline attribution needs. Errors name the file's row."""
    for times, entries, _ in _iter_tables(path, batch_steps, False, _columns_from_table,
                                          lambda t: t.last()):
        yield times, entries


def read_energy_parquet(path: str | Path) -> list[EnergySample]:
    """Read and validate an energy Parquet file (the checks of :func:`records.read_energy`, vectorised)."""
    path, (table, _) = str(path), read_table(path, "energy")
    n = table.num_rows
    cols = {name: one_chunk(table.column(name)) for name in table.schema.names}
    t, e = (as_numpy(column(cols, c, pa.float64(), path, "energy")) for c in ("t", "energy_j"))
    dev = as_numpy(column(cols, "device", pa.int64(), path, "energy"))
    bad_value = ~(np.isfinite(t) & np.isfinite(e))
    bad_device = dev < 0
    order = np.argsort(dev, kind="stable")
    prev = np.full(n, -np.inf)  # the time of each sample's predecessor of the same device
    prev[order[1:]] = np.where(dev[order[1:]] == dev[order[:-1]], t[order[:-1]], -np.inf)
    if (bad := bad_value | bad_device | (t < prev)).any():
        i = int(np.argmax(bad))
        problem = ("t and energy_j must be finite numbers" if bad_value[i] else
                   f"device must be >= 0, got {dev[i]}" if bad_device[i] else
                   f"samples of device {dev[i]} out of time order")
        raise InputError(problem, path, i + 1)
    if not n:
        raise InputError("no energy samples", path)
    source = column(cols, "source", pa.string(), path, "energy", required=False)
    with gc_paused():
        return list(map(EnergySample, t.tolist(), dev.tolist(), e.tolist(), pylist(source, n)))


def load_steps_any(path: str | Path) -> StepTrace:
    """steps.jsonl or steps.parquet, by extension."""
    return load_steps_parquet(path) if is_parquet(path) else records.load_steps(path)


def iter_step_chunks_any(path: str | Path) -> Iterator[tuple[list[StepRecord], EntryArrays]]:
    """steps.jsonl or steps.parquet a chunk at a time, by extension."""
    return iter_steps_parquet(path) if is_parquet(path) else records.iter_step_chunks(path)


def read_energy_any(path: str | Path) -> list[EnergySample]:
    """energy.jsonl or energy.parquet, by extension."""
    return read_energy_parquet(path) if is_parquet(path) else records.read_energy(path)
