"""The ``wattprint`` command. Subcommands import what they need lazily, so ``--help`` is instant.

Exit codes: 0 success, 2 bad input or configuration (the message names the file and line), 1 other errors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from wattprint import __version__
from wattprint.errors import WattprintError


def _atomic_write(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # an ordinary file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_geometry(spec: str):
    """A config.json path, a model directory, or the name of a shipped config (configs/models)."""
    from wattprint.configs import config_dir
    from wattprint.errors import ConfigError
    from wattprint.profiler.costmodel import geometry_from_config

    p = Path(spec)
    if not p.exists():
        shipped = config_dir() / "models" / f"{spec}.json"
        if not shipped.exists():
            names = ", ".join(sorted(x.stem for x in (config_dir() / "models").glob("*.json")))
            raise ConfigError(f"no model config file or shipped model named {spec!r} (shipped: {names})")
        p = shipped
    return geometry_from_config(p)


def _energy_source(samples) -> str:
    sources = {s.source for s in samples if s.source}
    return sources.pop() if len(sources) == 1 else ("mixed" if sources else "unknown")


def cmd_attribute(args) -> int:
    import msgspec

    from wattprint.profiler.attribution import attribute
    from wattprint.profiler.hardware import load_profile
    from wattprint.profiler.records import load_steps, read_energy

    g = _model_geometry(args.model)
    hw = load_profile(args.hardware)
    steps = load_steps(args.steps)
    samples = read_energy(args.energy)
    source = args.source or _energy_source(samples)
    result = attribute(steps, samples, g, hw, source=source, window_s=args.window_s, model_name=g.name,
                       energy_path=str(args.energy))
    enc = msgspec.json.Encoder()
    _atomic_write(args.out, b"".join(enc.encode(r) + b"\n" for r in result.requests))
    summary = msgspec.to_builtins(result.totals)
    summary.update(model=g.name, model_geometry=g.to_dict(), hardware=hw.name,
                   conservation_error=abs(result.totals.attributed_j + result.totals.idle_j
                                          - result.totals.measured_j) / max(result.totals.measured_j, 1e-300))
    if args.summary:
        _atomic_write(args.summary, msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n")
    if not args.quiet:
        from wattprint.exporters.report import print_report  # rich: only when a table is printed

        print_report(result.requests, result.totals, limit=args.limit)
    return 0


def cmd_simulate(args) -> int:
    from rich.console import Console

    from wattprint.profiler.hardware import load_profile
    from wattprint.profiler.simulate import WorkloadSpec, simulate

    g = _model_geometry(args.model)
    hw = load_profile(args.hardware)
    spec = WorkloadSpec(requests=args.requests, rate_rps=args.rate, seed=args.seed,
                        max_batched_tokens=args.max_batched_tokens)
    sim = simulate(g, hw, spec, n_devices=args.devices)
    sim.write(args.out)
    Console(stderr=True).print(
        f"[bold]simulated[/] {len(sim.steps)} steps, {len(sim.truth)} requests, {args.devices} device(s) "
        f"-> {args.out}/steps.jsonl, energy.jsonl, truth.jsonl (source: simulated, not a measurement)")
    return 0


def cmd_demo(args) -> int:
    """The offline demo: simulate a trace on the GPU twin, attribute it, compare with the truth."""
    import msgspec
    import numpy as np
    from rich.console import Console

    from wattprint.exporters.report import print_report
    from wattprint.profiler.attribution import attribute
    from wattprint.profiler.hardware import load_profile
    from wattprint.profiler.simulate import WorkloadSpec, simulate

    console = Console()
    console.rule("[bold]wattprint demo (offline)")
    console.print("[yellow bold]No GPU energy counter is used here: the energy comes from wattprint's "
                  "simulated H100 twin (source: simulated).[/]")
    g = _model_geometry(args.model)
    hw = load_profile(args.hardware)
    with console.status("simulating a Poisson workload on the twin..."):
        sim = simulate(g, hw, WorkloadSpec(requests=args.requests, rate_rps=args.rate, seed=args.seed))
        out = Path(args.out)
        sim.write(out)
    with console.status("attributing measured joules to requests..."):
        result = attribute(sim.steps, sim.energy, g, hw, source="simulated", model_name=g.name)
    print_report(result.requests, result.totals, limit=args.limit, console=console)
    enc = msgspec.json.Encoder()
    _atomic_write(out / "requests.jsonl", b"".join(enc.encode(r) + b"\n" for r in result.requests))
    _atomic_write(out / "summary.json", msgspec.json.encode(msgspec.to_builtins(result.totals)))
    err = np.array([abs(r.energy_j / sim.truth[r.id].energy_j - 1) for r in result.requests])
    console.print(f"accuracy against the twin's ground truth: per-request error median "
                  f"{100 * np.median(err):.2f} %, p95 {100 * np.percentile(err, 95):.2f} %")
    console.print(f"files in {out}/: steps.jsonl energy.jsonl truth.jsonl requests.jsonl summary.json")
    return 0


def _lazy(module: str, name: str):
    """A subcommand's function, imported only when the subcommand runs."""

    def call(*a, **kw):
        import importlib

        return getattr(importlib.import_module(module), name)(*a, **kw)

    return call


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. Subcommands whose options live in heavy modules (the sidecar imports ZeroMQ
    and prometheus-client) get their options only when ``command`` names them, so that, say,
    ``wattprint attribute`` does not pay for importing the sidecar."""

    def heavy(name: str) -> bool:
        return command is None or command == name

    p = argparse.ArgumentParser(prog="wattprint", description="GPU-native energy profiler for LLM inference")
    p.add_argument("--version", action="version", version=f"wattprint {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("attribute", help="attribute measured energy of a recorded trace to requests")
    a.add_argument("--steps", required=True, help="steps.jsonl")
    a.add_argument("--energy", required=True, help="energy.jsonl")
    a.add_argument("--model", required=True, help="model config.json, model directory, or shipped name")
    a.add_argument("--hardware", required=True, help="hardware profile YAML or shipped name (e.g. h100-sxm)")
    a.add_argument("--out", required=True, help="requests.jsonl to write")
    a.add_argument("--summary", help="summary.json to write")
    a.add_argument("--window-s", type=float, default=2.0, help="settlement block length (s)")
    a.add_argument("--source", help="override the energy source label")
    a.add_argument("--limit", type=int, default=20, help="rows of the printed table")
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=cmd_attribute)

    s = sub.add_parser("simulate", help="generate a trace on the simulated GPU twin (with ground truth)")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="llama-3.1-8b")
    s.add_argument("--hardware", default="h100-sxm")
    s.add_argument("--requests", type=int, default=300)
    s.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate (requests/s)")
    s.add_argument("--devices", type=int, default=1, help="tensor-parallel GPUs")
    s.add_argument("--max-batched-tokens", type=int, default=2048)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("demo", help="the main job: serve a tiny model with vLLM and attribute a mixed workload")
    d.add_argument("--out", default="wattprint-demo", help="output directory")
    d.add_argument("--meter", default="auto", choices=("auto", "nvml", "rapl", "cputime", "simulated"),
                   help="auto: NVML with a GPU, else the simulated twin")
    d.add_argument("--model", default=None, help="model directory to serve (default: build the tiny model)")
    d.add_argument("--hardware", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--timeout-s", type=float, default=420.0, help="how long the server may take to start")
    d.set_defaults(func=_lazy("wattprint.demo", "run_demo"))

    o = sub.add_parser("demo-offline", help="simulate a trace on the GPU twin and attribute it (no vLLM)")
    o.add_argument("--out", default="wattprint-demo-offline")
    o.add_argument("--model", default="llama-3.1-8b")
    o.add_argument("--hardware", default="h100-sxm")
    o.add_argument("--requests", type=int, default=200)
    o.add_argument("--rate", type=float, default=6.0)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--limit", type=int, default=15)
    o.set_defaults(func=cmd_demo)

    sc = sub.add_parser("sidecar", help="receive engine steps, attribute energy online, serve /metrics")
    sv = sub.add_parser("serve", help="the sidecar and vLLM's OpenAI server in one command: serve [options] -- ARGS")
    for name, sp in (("sidecar", sc), ("serve", sv)):
        if heavy(name):
            from wattprint.profiler.sidecar import add_sidecar_arguments

            add_sidecar_arguments(sp)
    sc.set_defaults(func=_lazy("wattprint.profiler.sidecar", "run_sidecar"))
    sv.set_defaults(func=lambda a: _lazy("wattprint.profiler.serve", "run_serve")(a, a.vllm_args))

    pf = sub.add_parser("profile", help="run prompts through vLLM offline and attribute their energy")
    if heavy("profile"):
        from wattprint.profiler.profile import add_profile_arguments

        add_profile_arguments(pf)
    pf.set_defaults(func=_lazy("wattprint.profiler.profile", "run_profile"))
    c = sub.add_parser("calibrate", help="measure a GPU's energy per FLOP, per byte and per KV byte (Triton kernels)")
    if heavy("calibrate"):
        from wattprint.profiler.calibrate import add_calibrate_arguments

        add_calibrate_arguments(c)
    c.set_defaults(func=_lazy("wattprint.profiler.calibrate", "run_calibrate"))

    t = sub.add_parser("tiny-model", help="write a small random-weight Llama and a tokenizer (no downloads)")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny_model)
    return p


def cmd_tiny_model(args) -> int:
    from wattprint.profiler.tinymodel import write_tiny_model

    path = write_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model in {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_args: list[str] = []
    if "--" in argv:  # `wattprint serve [options] -- <vLLM server arguments>`
        i = argv.index("--")
        argv, vllm_args = argv[:i], argv[i + 1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command is not None else "")
    args = parser.parse_args(argv)
    args.vllm_args = vllm_args
    try:
        return int(args.func(args) or 0)
    except WattprintError as exc:
        print(f"wattprint {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"wattprint {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
