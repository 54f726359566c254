"""``wattprint convert IN OUT``: steps, energy, requests or a ledger between JSON lines and Parquet (the
format of each file is its extension: ``.parquet`` or ``.jsonl``; what it holds is read from it)."""

from __future__ import annotations

import argparse

KINDS = ("steps", "energy", "requests", "ledger")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a .jsonl or .parquet file of steps, energy, requests or a ledger")
    p.add_argument("output", help="the file to write, in the other format (.parquet or .jsonl)")
    p.add_argument("--kind", choices=KINDS, help="what the input holds (default: told from its content)")


def convert(src: str, dst: str, kind: str | None = None) -> tuple[str, int, dict]:
    """Convert one file; returns (kind, records written, lines skipped by reason)."""
    from collections import Counter

    from wattprint.errors import InputError
    from wattprint.files import atomic_write
    from wattprint.profiler.core import resultfiles as rf
    from wattprint.profiler.core import tracefiles as tf
    from wattprint.profiler.core.columnar import is_parquet, table_bytes
    from wattprint.profiler.core.records import encode_line, step_line

    if is_parquet(src) == is_parquet(dst):
        raise InputError(f"{src} and {dst} are both {'Parquet' if is_parquet(src) else 'JSON lines'}: "
                         "one of them must end in .parquet, the other in .jsonl")
    kind = kind or tf.detect_kind(src)
    to_parquet = is_parquet(dst)
    skipped: Counter = Counter()
    if kind == "steps":
        trace = tf.load_steps_any(src)
        n = len(trace.steps)
        data = (table_bytes(tf.steps_table(trace), kind) if to_parquet
                else b"".join(map(step_line, trace.steps)))
    elif kind == "energy":
        samples = tf.read_energy_any(src)
        n = len(samples)
        data = table_bytes(tf.energy_table(samples), kind) if to_parquet else b"".join(map(encode_line, samples))
    elif kind == "requests":
        results = rf.read_requests_any(src)
        n = len(results)
        data = table_bytes(rf.records_table(results, kind), kind) if to_parquet else b"".join(map(encode_line, results))
    else:
        lines = rf.read_ledger_any(src, skipped)
        n = len(lines)
        data = table_bytes(rf.records_table(lines, kind), kind) if to_parquet else rf.ledger_jsonl(lines)
    atomic_write(dst, data, mode=0o600)
    return kind, n, dict(skipped)


def run(args: argparse.Namespace) -> int:
    kind, n, skipped = convert(args.input, args.output, args.kind)
    note = "".join(f"; skipped {v} ({k})" for k, v in sorted(skipped.items()))
    print(f"wrote {args.output}: {n} {kind} records{note}")
    return 0
