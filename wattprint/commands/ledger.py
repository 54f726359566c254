"""``wattprint ledger compact LEDGER --out DIR``: a request ledger as Parquet files partitioned by day
(``DIR/date=YYYY-MM-DD/part-<instance>.parquet``), the layout DuckDB, Spark and Trino read as one table
(``docs/fleet.md``).

A line's day is the UTC date of its ``logged_unix_s`` (the wall-clock time the ledger logged it). Lines
without one (ledgers written before it was recorded) take ``--undated-date``, by default the UTC date
of the ledger file's last change; they are counted. Lines that are not request records, a torn last
line, and lines whose time is not a plausible date are skipped and counted by reason.

Compacting the same ledger again replaces its files (they are named after the host, the ledger's name
and a hash of its first line, so that a rotated ledger gets new names and never overwrites the old
one's); files are private (0600, directories 0700) and each is written whole or not at all.
"""

from __future__ import annotations

import argparse

#: logged times outside [2000-01-01, 2200-01-01) are not plausible wall-clock times
PLAUSIBLE_UNIX_S = (946_684_800.0, 7_258_118_400.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    c = sub.add_parser("compact", help="write a ledger as Parquet partitioned by day (date=YYYY-MM-DD/)")
    c.add_argument("ledger", help="ledger.jsonl (the sidecar's request ledger)")
    c.add_argument("--out", required=True, help="directory of the partitioned table (shared by a fleet's ledgers)")
    c.add_argument("--instance", help="name of this ledger's files (default: host, ledger name, first-line hash)")
    c.add_argument("--undated-date", metavar="YYYY-MM-DD",
                   help="day of lines without logged_unix_s (default: the ledger file's last change, UTC)")


def _instance_name(path, given: str | None) -> str:
    import hashlib
    import re
    import socket
    from pathlib import Path

    if given:
        name = given
    else:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
        digest = hashlib.sha256(first).hexdigest()[:12]
        name = f"{socket.gethostname()}-{Path(path).stem}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _day(value: str | None, path) -> str:
    import datetime as dt
    import os

    from wattprint.errors import ConfigError

    if value is None:
        return dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.timezone.utc).date().isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ConfigError(f"--undated-date must be YYYY-MM-DD, got {value!r}") from None


def compact(ledger, out, *, instance: str | None = None, undated_date: str | None = None) -> dict:
    """Compact one ledger into ``out``; returns what was done: ``days`` (day -> rows), ``files``,
    ``undated`` (lines dated by the fallback) and ``skipped`` (reason -> lines)."""
    from collections import Counter, defaultdict
    from pathlib import Path

    import numpy as np
    import pyarrow as pa

    from wattprint.errors import InputError
    from wattprint.files import atomic_write
    from wattprint.profiler.core.columnar import table_bytes
    from wattprint.profiler.core.resultfiles import iter_ledger_jsonl, records_table

    skipped: Counter = Counter()
    by_day: dict[str, list[pa.Table]] = defaultdict(list)
    undated = 0
    try:
        fallback = _day(undated_date, ledger)
        name = _instance_name(ledger, instance)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", str(ledger)) from exc
    for chunk in iter_ledger_jsonl(ledger, skipped):
        table = records_table(chunk, "ledger")
        logged = table.column("logged_unix_s").to_numpy(zero_copy_only=False).astype(float)
        missing = np.isnan(logged)
        implausible = ~missing & ~((logged >= PLAUSIBLE_UNIX_S[0]) & (logged < PLAUSIBLE_UNIX_S[1]))
        skipped["logged_unix_s is not a plausible time"] += int(implausible.sum())
        undated += int(missing.sum())
        ok = ~implausible
        days = np.where(missing, 0, logged).astype("datetime64[s]").astype("datetime64[D]").astype(str)
        days = np.where(missing, fallback, days)
        for day in np.unique(days[ok]).tolist():
            by_day[day].append(table.filter(pa.array(ok & (days == day))))
    out = Path(out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = []
    for day, parts in sorted(by_day.items()):
        part_dir = out / f"date={day}"
        part_dir.mkdir(mode=0o700, exist_ok=True)
        path = part_dir / f"part-{name}.parquet"
        atomic_write(path, table_bytes(pa.concat_tables(parts), "ledger"), mode=0o600)
        files.append(path)
    return {"days": {d: sum(t.num_rows for t in p) for d, p in sorted(by_day.items())}, "files": files,
            "undated": undated, "fallback_day": fallback, "skipped": {k: v for k, v in skipped.items() if v}}


def run(args: argparse.Namespace) -> int:
    done = compact(args.ledger, args.out, instance=args.instance, undated_date=args.undated_date)
    rows = sum(done["days"].values())
    print(f"{args.ledger}: {rows} lines in {len(done['days'])} day partition(s) under {args.out}")
    if done["undated"]:
        print(f"  {done['undated']} line(s) without logged_unix_s dated {done['fallback_day']}")
    for reason, n in sorted(done["skipped"].items()):
        print(f"  skipped {n} line(s): {reason}")
    return 0
