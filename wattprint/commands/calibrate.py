"""``wattprint calibrate``: measure a GPU's energy coefficients and write a hardware profile.

``--meter nvml`` runs the calibration kernels on the GPU
(:class:`~wattprint.profiler.calibrate.gpudevice.GpuDevice`); ``--meter simulated`` runs the same plan
and analysis on :class:`~wattprint.profiler.calibrate.simdevice.SimulatedDevice` (no kernel runs, no
time passes) with the coefficients of a TRUE profile. The procedure is
:func:`wattprint.profiler.calibrate.procedure.calibrate`; this module parses the options, shows
progress, writes the profile (atomically: an interruption leaves no profile, or the previous one) and
prints a summary. Exit codes: 0, 2 on a usage or meter error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse

from wattprint.profiler.calibrate.plan import DEFAULT_RISE_S, DEFAULT_SECONDS

DEFAULT_SIM_PROFILE = "h100-sxm"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``wattprint calibrate``."""
    parser.add_argument("--device", type=int, default=0, metavar="N", help="NVML index of the GPU (default 0)")
    parser.add_argument("--meter", choices=("nvml", "simulated"), default="nvml",
                        help="nvml: run the kernels on the GPU; simulated: a simulated GPU, nothing runs")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, metavar="S",
                        help="measured seconds per run (default 5); the cool-down is S and the idle window 2*S")
    parser.add_argument("--rise-seconds", type=float, default=DEFAULT_RISE_S, metavar="R",
                        help=f"start of each run discarded as rise time (default {DEFAULT_RISE_S:g})")
    parser.add_argument("--trials", type=int, default=2, help="repetitions of each configuration (default 2)")
    parser.add_argument("--simulate", metavar="TRUE.yaml", default=None,
                        help=f"TRUE profile of the simulated GPU (path or shipped name; default {DEFAULT_SIM_PROFILE})")
    parser.add_argument("--sensor-gain", type=float, default=None,
                        help="simulated counter's gain (default: drawn in [0.96, 1.04] from the seed)")
    parser.add_argument("--seed", type=int, default=0, help="run order and simulation noise (default 0)")
    parser.add_argument("--name", default=None, help="profile name (default: from the device name)")
    parser.add_argument("--out", required=True, metavar="PROFILE.yaml", help="where to write the profile")
    return parser


def run(args: argparse.Namespace) -> int:
    """``wattprint calibrate``. Returns the exit code: 0, 2 on a usage/meter error, 130 on Ctrl-C."""
    from pathlib import Path

    from rich.console import Console

    from wattprint.errors import MeterError, WattprintError
    from wattprint.profiler.core.hardware import load_profile, save_profile

    console = Console()
    err = Console(stderr=True)
    out = Path(args.out)
    device = None
    try:
        if args.seconds <= 0 or args.trials <= 0 or args.rise_seconds < 0:
            err.print("[red]error:[/] --seconds and --trials must be positive, --rise-seconds not negative")
            return 2
        if not out.parent.is_dir():
            err.print(f"[red]error:[/] the directory of --out does not exist: {out.parent}")
            return 2
        if args.meter == "simulated":
            from wattprint.profiler.calibrate.simdevice import SimulatedDevice

            true = load_profile(args.simulate or DEFAULT_SIM_PROFILE)
            device = SimulatedDevice(true, seed=args.seed, gain=args.sensor_gain)
        else:
            if args.simulate or args.sensor_gain is not None:
                err.print("[red]error:[/] --simulate and --sensor-gain need --meter simulated")
                return 2
            try:
                from wattprint.profiler.calibrate.gpudevice import GpuDevice

                device = GpuDevice(args.device, seed=args.seed)
            except (MeterError, ImportError) as exc:
                err.print(f"[red]error:[/] cannot calibrate GPU {args.device} with NVML: {exc}\n"
                          "Calibration needs an NVIDIA GPU with a working driver, CUDA torch and triton; "
                          "use --meter simulated to try the procedure without one.")
                return 2
        result = _calibrate_with_progress(device, args, console)
        header = (f"# Calibrated by `wattprint calibrate --meter {args.meter}` on {result.profile.fit['date']}"
                  + (" (SIMULATED: not a measurement)" if args.meter == "simulated" else ""))
        save_profile(result.profile, out, header)
        print_summary(console, result, out)
        return 0
    except KeyboardInterrupt:
        err.print("[yellow]interrupted:[/] no profile written")
        return 130
    except (WattprintError, ValueError) as exc:
        err.print(f"[red]error:[/] {exc}")
        return 2
    finally:
        if device is not None:
            device.close()


def _calibrate_with_progress(device, args, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from wattprint.profiler.calibrate.procedure import calibrate

    columns = (TextColumn("[bold]calibrate[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("idle power", total=None)

        def progress(label, done, total):
            bar.update(task, description=label, completed=done, total=total)

        return calibrate(device, seconds=args.seconds, trials=args.trials, seed=args.seed, name=args.name,
                         rise_s=args.rise_seconds,
                         meter=args.meter, device_index=args.device, progress=progress)


def print_summary(console, result, out=None) -> None:
    """The fitted coefficients with their intervals (and, simulated, the truth they should recover)."""
    from rich.table import Table

    from wattprint.profiler.calibrate.analysis import NEAR_LIMIT_FRACTION

    fit, prof = result.fit, result.profile
    table = Table(title=f"calibration of {prof.fit['device']} ({prof.fit['source']})")
    table.add_column("coefficient", no_wrap=True)
    table.add_column("estimate", justify="right", no_wrap=True)
    table.add_column("95 % CI", justify="right", no_wrap=True)
    if result.truth:
        table.add_column("truth × gain", justify="right", no_wrap=True)
        table.add_column("error", justify="right", no_wrap=True)
    for i, key in enumerate(fit.names):
        est = float(fit.estimate[i])
        lo, hi = fit.interval(key)
        row = [key, f"{est:.4g}", f"± {100 * (hi - lo) / 2 / abs(est):.2f} %" if est else "-"]
        if result.truth:
            t = result.truth["through_counter"][key]
            row += [f"{t:.4g}", f"{100 * (est / t - 1):+.2f} %"]
        table.add_row(*row)
    idle_row = ["idle_power_w", f"{result.idle_power_w:.4g}", "-"]
    if result.truth:
        t = result.truth["through_counter"]["idle_power_w"]
        idle_row += [f"{t:.4g}", f"{100 * (result.idle_power_w / t - 1):+.2f} %"]
    table.add_row(*idle_row)
    console.print(table)
    console.print(f"R² {fit.r2:.5f} over {fit.n} runs ({fit.dof} dof); rms relative residual "
                  f"{100 * fit.rms_relative_residual:.2f} %; peaks achieved {prof.peak_flops / 1e12:.0f} TFLOP/s, "
                  f"{prof.peak_bandwidth_bytes_s / 1e12:.2f} TB/s"
                  + (f"; simulated sensor gain {prof.fit['simulation']['sensor_gain']}" if result.truth else ""))
    near = prof.fit["runs_near_power_limit"]
    if near:
        console.print(f"{near} run(s) averaged ≥ {NEAR_LIMIT_FRACTION:.0%} of the power limit (see docs/calibration.md)")
    for w in prof.fit.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    if out is not None:
        console.print(f"profile written to {out}")
