"""The ``wattprint`` command: parses arguments and maps errors to exit codes, nothing else.

Each subcommand is one module of :mod:`wattprint.commands` with ``add_arguments(parser)`` and
``run(args)``; only the chosen one is imported (``--help`` imports them all, and they import their heavy
dependencies only when they run).

Exit codes: 0 success, 2 bad input or configuration (the message names the file and line), 3 a
conservation violation (a bug; no output is written), 1 other errors.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from wattprint import __version__
from wattprint.errors import ConservationError, WattprintError

#: subcommand, then its help; the module is wattprint.commands.<subcommand with "_" for "-">
_TABLE = """
attribute     attribute measured energy of a recorded trace to requests
simulate      generate a trace on the simulated GPU twin (with ground truth)
demo          the main job: serve a tiny model with vLLM and attribute a mixed workload
demo-offline  simulate a trace on the GPU twin and attribute it (no vLLM)
sidecar       receive engine steps, attribute energy online, serve /metrics
serve         the sidecar and vLLM's OpenAI server in one command: serve [options] -- ARGS
profile       run prompts through vLLM offline and attribute their energy
calibrate     measure a GPU's energy per FLOP, per byte and per KV byte (Triton kernels)
tiny-model    write a small random-weight Llama and a tokenizer (no downloads)
report        one self-contained HTML report of a run (plots, sources named)
convert       convert steps, energy, requests or a ledger between JSON lines and Parquet
ledger        ledger tools: compact a ledger into Parquet partitioned by day
policy        audit a ledger against an access policy: energy, classes and decisions by stratum
"""
#: subcommand -> (module under wattprint.commands, help)
COMMANDS = {name: (name.replace("-", "_"), help_text.strip())
            for name, _, help_text in (line.partition(" ") for line in _TABLE.strip().splitlines())}


def _module(name: str):
    return importlib.import_module(f"wattprint.commands.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s options are added (all when ``command`` is None)."""
    p = argparse.ArgumentParser(prog="wattprint", description="GPU-native energy profiler for LLM inference")
    p.add_argument("--version", action="version", version=f"wattprint {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text)
        if command is None or command == name:
            _module(name).add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args: list[str] = []
    if "--" in argv:  # `wattprint serve [options] -- <vLLM server arguments>`
        i = argv.index("--")
        argv, vllm_args = argv[:i], argv[i + 1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    args.vllm_args = vllm_args
    try:
        return int(_module(args.command).run(args) or 0)
    except ConservationError as exc:
        print(f"wattprint {args.command}: error: {exc}", file=sys.stderr)
        return 3
    except WattprintError as exc:
        print(f"wattprint {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wattprint {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
