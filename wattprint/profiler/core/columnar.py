"""Arrow columns read strictly and without per-row Python, and Parquet files that say what they hold
(the helpers of :mod:`wattprint.profiler.core.tracefiles` and :mod:`wattprint.profiler.core.resultfiles`).

Values come out of Arrow buffers directly (``as_numpy``), not through ``to_numpy``: where pandas is
installed, pyarrow imports it on that path, which costs about 0.3 s a process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wattprint.errors import InputError
from wattprint.profiler.core.records import is_parquet  # noqa: F401 - here for the readers of columnar files

KINDS = ("steps", "energy", "requests", "ledger")
KIND_KEY = b"wattprint.kind"
VERSION_KEY = b"wattprint.format"
FORMAT_VERSION = b"1"
SMALL_ROWS = 1 << 16  # string columns up to this long are read value by value (no compute kernel)
ROW_GROUP_ROWS = 2048  # rows a group: what a reader decodes at once (steps: ~200 k entries, ~30 MB)


def table_bytes(table: pa.Table, kind: str) -> bytes:
    """A Parquet file (zstd, ids dictionary-encoded) of ``table``, marked as holding ``kind``."""
    meta = {**(table.schema.metadata or {}), KIND_KEY: kind.encode(), VERSION_KEY: FORMAT_VERSION}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue().to_pybytes()


def arrow_call(fn, path: str):
    """``fn()``, with a file that cannot be read or is not Parquet refused as an :class:`InputError`."""
    try:
        return fn()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path) from exc
    except pa.ArrowException as exc:
        raise InputError(f"not a readable Parquet file: {exc}", path) from exc


def parquet_file(path: str | Path, dictionary: tuple[str, ...] = (), whole: bool = False) -> pq.ParquetFile:
    """An open Parquet file whose string columns at the paths ``dictionary`` (where present) are read as
    dictionaries; ``whole``: to be read at once, and then only in a file of one row group (pyarrow cannot
    read nested dictionaries across groups). Not pq.read_table: its dataset layer costs ~0.3 s a process."""
    def open_file() -> pq.ParquetFile:
        meta = pq.read_metadata(path)
        one = meta.num_row_groups == 1 or not whole
        have = {meta.schema.column(i).path for i in range(meta.num_columns)} if one else ()
        return pq.ParquetFile(path, read_dictionary=[c for c in dictionary if c in have] or None)

    return arrow_call(open_file, str(path))


def read_table(path: str | Path, kind: str | None = None, dictionary: tuple[str, ...] = ()) -> tuple[pa.Table, str]:
    """A Parquet file's table and what it holds (checked against ``kind`` when given)."""
    with parquet_file(path, dictionary, whole=True) as f:
        table = arrow_call(f.read, str(path))
    held = detect_kind_columns(table.schema, str(path))
    if kind is not None and held != kind:
        raise InputError(f"holds {held} records, not {kind}", str(path))
    return table, held


def detect_kind_columns(schema: pa.Schema, path: str) -> str:
    """The kind recorded in the metadata, else the one whose required columns are all present."""
    meta = (schema.metadata or {}).get(KIND_KEY)
    if meta is not None and meta.decode(errors="replace") in KINDS:
        return meta.decode()
    names = set(schema.names)
    for kind, required in (("steps", {"step", "requests"}), ("energy", {"t", "device", "energy_j"}),
                           ("ledger", {"id", "energy_j", "j_per_output_token"}), ("requests", {"id", "energy_j"})):
        if required <= names:
            return kind
    raise InputError("not a wattprint steps, energy, requests or ledger table", path)



def column(arrays: dict, name: str, want: pa.DataType, path: str, what: str, required: bool = True,
            offsets: np.ndarray | None = None) -> pa.Array | None:
    """Column ``name`` cast to ``want`` (ints may widen, floats take ints); a missing or null value of a
    required column is refused naming its row (``offsets``: of the steps' entries, for entry columns)."""
    arr = arrays.get(name)
    if arr is None:
        if required:
            raise InputError(f"{what} column {name!r} is missing", path)
        return None
    t = arr.type
    ok = (pa.types.is_integer(t) if pa.types.is_integer(want) else
          (pa.types.is_integer(t) or pa.types.is_floating(t)) if pa.types.is_floating(want) else
          (pa.types.is_string(t) or pa.types.is_large_string(t)) if pa.types.is_string(want) else t == want)
    if not ok and not pa.types.is_null(t):
        raise InputError(f"{what} column {name!r} has type {t}, expected {want}", path)
    if required and arr.null_count:
        i = int(np.argmin(valid(arr)))
        row = i if offsets is None else int(np.searchsorted(offsets, i, side="right")) - 1
        raise InputError(f"{what} field {name!r} is null", path, row + 1)
    if t == want:
        return arr  # nothing to cast (a cast loads pyarrow.compute: ~0.08 s a process)
    try:
        return arr.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{what} column {name!r}: {exc}", path) from exc


def one_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _bits(buf, offset: int, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buf, np.uint8), bitorder="little")[offset:offset + n].astype(bool)


def valid(arr: pa.Array) -> np.ndarray:
    """Which values are not null (read from the validity bitmap)."""
    if arr.null_count == 0 or arr.buffers()[0] is None:
        return np.full(len(arr), arr.null_count == 0)
    return _bits(arr.buffers()[0], arr.offset, len(arr))


def as_numpy(arr: pa.Array) -> np.ndarray:
    """A fixed-width column as numpy, straight from its buffer (null slots hold anything). Not
    ``to_numpy``: where pandas is installed, pyarrow imports it on that path (~0.3 s a process)."""
    dtype = np.dtype(bool if pa.types.is_boolean(arr.type) else arr.type.to_pandas_dtype())
    if len(arr) == 0:
        return np.zeros(0, dtype)
    if pa.types.is_boolean(arr.type):
        return _bits(arr.buffers()[1], arr.offset, len(arr))
    return np.frombuffer(arr.buffers()[1], dtype, len(arr), arr.offset * dtype.itemsize)


def all_default(arr: pa.Array | None, default) -> bool:
    if arr is None or arr.null_count == len(arr):
        return True
    return default is False and not as_numpy(arr)[valid(arr)].any()


def pylist(arr: pa.Array | None, n: int, default=None) -> list:
    """Python values of a nullable column, built in C loops (nulls become ``default``)."""
    if arr is None or arr.null_count == n:
        return [default] * n
    if arr.null_count > n - n // 8:  # mostly null (a request's stratum, given once): set the few values
        out = [default] * n
        where = np.flatnonzero(valid(arr)).tolist()
        for i, v in zip(where, arr.drop_null().to_pylist()):
            out[i] = v
        return out
    if pa.types.is_string(arr.type) and n <= SMALL_ROWS:
        return [default if v is None else v for v in arr.to_pylist()]
    if pa.types.is_string(arr.type):  # via a dictionary: one str object per distinct value
        import pyarrow.compute as pc  # only here (large columns): its import costs ~0.08 s a process

        enc = pc.dictionary_encode(arr, null_encoding="mask")
        values = np.array(enc.dictionary.to_pylist() + [default], dtype=object)
        return values[np.where(valid(enc.indices), as_numpy(enc.indices), len(values) - 1)].tolist()
    if arr.null_count == 0:
        return as_numpy(arr).tolist()
    out = np.full(n, default, dtype=object)
    ok = valid(arr)
    out[ok] = as_numpy(arr)[ok]
    return out.tolist()


def int_list(values: np.ndarray) -> list[int]:
    """``values.tolist()``; values below 2**17 share one int object each (built once: faster, and a
    context length repeated over a million entries is stored once)."""
    if len(values) and 0 <= values.min() and values.max() < 1 << 17:
        return np.arange(int(values.max()) + 1).astype(object)[values].tolist()
    return values.tolist()


def row_lines(n: int) -> bytes:
    """Stand-in for a file's lines: row ``k`` (1-based) is line ``k`` in error messages."""
    return b"r\n" * n
