"""Results as files: requests and ledger lines, in JSON lines or Parquet (``docs/formats.md``).

The Parquet schemas follow the records themselves (:class:`RequestResult`, :class:`LedgerLine`): a field
added there is a column here. Ledger lines are read the way the ledger itself recovers them: a torn last
line (no newline: a write cut short) and lines that are not request records are skipped, and counted by
reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import msgspec
import pyarrow as pa

from wattprint.errors import InputError
from wattprint.profiler.core import records
from wattprint.profiler.core.columnar import is_parquet, read_table
from wattprint.profiler.core.results import RequestResult


class LedgerLine(RequestResult):
    """A ledger line: a request's result, its energy per output token, and where the ledger records them,
    the engine it came from and the wall-clock time it was logged (Unix seconds)."""

    j_per_output_token: float | None = None
    engine: str | None = None
    logged_unix_s: float | None = None


_ARROW = {msgspec.inspect.IntType: pa.int64(), msgspec.inspect.FloatType: pa.float64(),
          msgspec.inspect.StrType: pa.string(), msgspec.inspect.BoolType: pa.bool_()}


def _struct_schema(cls) -> pa.Schema:
    out = []
    for f in msgspec.inspect.type_info(cls).fields:
        t, nullable = f.type, False
        if isinstance(t, msgspec.inspect.UnionType):
            t, nullable = next(x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)), True
        out.append(pa.field(f.name, _ARROW[type(t)], nullable=nullable or not f.required))
    return pa.schema(out)


REQUESTS_SCHEMA = _struct_schema(RequestResult)
LEDGER_SCHEMA = _struct_schema(LedgerLine)
SCHEMAS = {"requests": REQUESTS_SCHEMA, "ledger": LEDGER_SCHEMA}
_LEDGER_ONLY = tuple(n for n in LEDGER_SCHEMA.names if n not in REQUESTS_SCHEMA.names)
MAX_LINE_BYTES = 1 << 20  # a ledger line is a few hundred bytes; longer ones are skipped, not held
_ledger_decoder = msgspec.json.Decoder(LedgerLine)
_encoder = msgspec.json.Encoder()


def records_table(rows: Sequence[msgspec.Struct], kind: str) -> pa.Table:
    """Requests (:class:`RequestResult`) or ledger lines (:class:`LedgerLine`) as a table."""
    schema = SCHEMAS[kind]
    return pa.Table.from_arrays([pa.array([getattr(r, f.name, None) for r in rows], f.type) for f in schema],
                                schema=schema)


def read_records_parquet(path: str | Path, kind: str) -> list:
    """Requests (:class:`RequestResult`) or ledger lines (:class:`LedgerLine`), validated by type."""
    table, _ = read_table(path, kind)
    for field in SCHEMAS[kind]:
        if not field.nullable and field.name not in table.schema.names:
            raise InputError(f"{kind} column {field.name!r} is missing", str(path))
    cls = LedgerLine if kind == "ledger" else RequestResult
    try:
        return msgspec.convert(table.to_pylist(), list[cls])
    except msgspec.ValidationError as exc:
        row = str(exc).partition("$[")[2].partition("]")[0]
        raise InputError(f"invalid {kind} record: {exc}", str(path), int(row) + 1 if row.isdigit() else None) from None


def read_requests_any(path: str | Path) -> list[RequestResult]:
    """requests.jsonl or requests.parquet, by extension (a bad line or row is an error naming it)."""
    if is_parquet(path):
        return read_records_parquet(path, "requests")
    return records.decode_lines(records.read_bytes(path), msgspec.json.Decoder(RequestResult), str(path))


def iter_ledger_jsonl(path: str | Path, skipped: Counter, chunk_lines: int = 1 << 16) -> Iterator[list[LedgerLine]]:
    """A ledger's valid lines, ``chunk_lines`` at a time (bounded memory); what is skipped is counted
    in ``skipped`` by reason."""
    chunk: list[LedgerLine] = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(path)) from exc
    with f:
        for raw in iter(partial(f.readline, MAX_LINE_BYTES), b""):
            if not raw.endswith(b"\n"):
                if len(raw) < MAX_LINE_BYTES:
                    skipped["torn last line"] += 1
                    break
                skipped["line too long"] += 1
                while raw and not raw.endswith(b"\n"):  # skip the rest of it
                    raw = f.readline(MAX_LINE_BYTES)
                continue
            if not raw.strip():
                continue
            try:
                chunk.append(_ledger_decoder.decode(raw))
            except msgspec.ValidationError:
                skipped["not a request record"] += 1
            except msgspec.DecodeError:
                skipped["malformed JSON"] += 1
            if len(chunk) >= chunk_lines:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def read_ledger_any(path: str | Path, skipped: Counter | None = None) -> list[LedgerLine]:
    """A ledger in JSON lines or Parquet (by extension), its valid lines."""
    if is_parquet(path):
        return read_records_parquet(path, "ledger")
    skipped = Counter() if skipped is None else skipped
    return [line for chunk in iter_ledger_jsonl(path, skipped) for line in chunk]


def ledger_jsonl(lines: Sequence[LedgerLine]) -> bytes:
    """Ledger lines as JSON lines (the ledger-only fields left out where empty, as the ledger writes)."""
    out = []
    for line in lines:
        d = msgspec.structs.asdict(line)
        for name in _LEDGER_ONLY:
            if d[name] is None:
                del d[name]
        out.append(_encoder.encode(d) + b"\n")
    return b"".join(out)
