"""What the vLLM step hook costs: the same offline workload with and without it.

Each run is a fresh subprocess (``vllm.LLM`` on the tiny random-weight model, CPU or GPU), the
variants alternate (off, hook, off, hook, ... with the order flipped every other round), and each run
times the workload ``--reps`` times after a warm-up. The hook runs with ``WATTPRINT_HOOK_STATS`` set,
so that it times its own code per step (``perf_counter_ns`` around our code only) and writes a
summary. This process plays the sidecar: a PULL socket drained by a thread.

    .venv/bin/python bench/bench_hook_overhead.py                  # direct sender vs no hook
    .venv/bin/python bench/bench_hook_overhead.py --senders direct thread --rounds 3

Prints a markdown summary (and ``--json PATH`` writes the raw numbers).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ("energy prefill decode cache token step river house morning science history market "
         "garden window question answer").split()


def _prompts(n: int) -> list[str]:
    return [f"Request {i}: tell me about the {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i) % len(WORDS)]}"
            for i in range(n)]


# -- worker (one engine) ---------------------------------------------------------------------------


def worker(args) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        args.model,
        max_model_len=2048,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,
        enable_prefix_caching=False,  # every rep does the same work
        seed=0,
    )
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    prompts = _prompts(args.prompts)
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    if args.paired:
        # EngineCore runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the hook's observer
        # is here: switch it on and off between repetitions (ABBA order) of the same workload.
        from wattprint.profiler.vllm import hook

        obs = hook.observer()
        if obs is None:
            raise SystemExit("paired mode: the hook is not installed in this process")
        results = []
        for i in range(args.paired):
            for on in ((True, False) if i % 2 == 0 else (False, True)):
                obs.enabled = on
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sp, use_tqdm=False)
                seconds = time.perf_counter() - t0
                n_out = sum(len(o.outputs[0].token_ids) for o in outs)
                results.append({"pair": i, "hook": on, "seconds": seconds, "output_tokens": n_out})
        obs.enabled = True
        print("BENCH_PAIRED " + json.dumps(results), flush=True)
        return
    results = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        n_in = sum(len(o.prompt_token_ids) for o in outs)
        results.append({"seconds": seconds, "output_tokens": n_out, "prompt_tokens": n_in})
    print("BENCH_RESULT " + json.dumps(results), flush=True)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass


# -- orchestrator ----------------------------------------------------------------------------------


class Sink:
    """The sidecar's end: keeps the raw messages while an engine runs (cheap: no decoding then, so
    that on a small machine the sink does not compete with the engine for CPU) and decodes them
    between runs."""

    def __init__(self, address: str):
        import zmq

        from wattprint.profiler.transport import messages as transport

        self.transport = transport
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.bind(address)
        self.raw: list[bytes] = []
        self.messages = self.records = self.hellos = self.bad = 0
        self.max_dropped = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.sock.poll(100):
                self.raw.append(self.sock.recv(copy=True))

    def take(self) -> list[float]:
        """Decode what arrived since the last call; returns the step durations (ms)."""
        raw, self.raw = self.raw, []
        step_ms = []
        for data in raw:
            try:
                msg = self.transport.decode(data)
            except Exception:  # noqa: BLE001
                self.bad += 1
                continue
            self.messages += 1
            if isinstance(msg, self.transport.Hello):
                self.hellos += 1
            else:
                self.records += len(msg.records)
                self.max_dropped = max(self.max_dropped, msg.dropped_total)
                step_ms.extend(1000 * (r.t_end - r.t_start) for r in msg.records)
        return step_ms

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close(linger=0)
        self.ctx.term()


def _run_one(args, variant: str, address: str, tmp: Path, index: int) -> dict:
    env = dict(os.environ)
    for k in ("WATTPRINT_SIDECAR", "WATTPRINT_HOOK_STATS", "WATTPRINT_HOOK_SENDER"):
        env.pop(k, None)
    stats_path = tmp / f"stats-{index}-{variant}.json"
    if variant != "off":
        env["WATTPRINT_SIDECAR"] = address
        env["WATTPRINT_HOOK_SENDER"] = variant
        env["WATTPRINT_HOOK_STATS"] = str(stats_path)
    cmd = [sys.executable, __file__, "--worker", "--model", str(args.model), "--prompts", str(args.prompts),
           "--max-tokens", str(args.max_tokens), "--reps", str(args.reps), "--max-num-seqs", str(args.max_num_seqs),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    log = tmp / f"run-{index}-{variant}.log"
    load_before = os.getloadavg()[0]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=900)
    load_after = os.getloadavg()[0]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 and line is None:
        raise SystemExit(f"run {index} ({variant}) failed, see {log}")
    reps = json.loads(line.removeprefix("BENCH_RESULT "))
    tok_s = [r["output_tokens"] / r["seconds"] for r in reps]
    out = {"variant": variant, "index": index, "reps": reps, "output_tok_s": statistics.median(tok_s),
           "loadavg_1m": [load_before, load_after]}
    if variant != "off":
        for _ in range(50):  # the summary is written when the engine goes idle / shuts down
            if stats_path.exists():
                break
            time.sleep(0.1)
        out["hook"] = json.loads(stats_path.read_text()) if stats_path.exists() else None
    return out


def _run_paired(args, address: str, tmp: Path) -> dict:
    """One process, EngineCore in-process, the hook switched on/off between repetitions."""
    env = dict(os.environ)
    env.update({"WATTPRINT_SIDECAR": address, "WATTPRINT_HOOK_SENDER": args.senders[0],
                "WATTPRINT_HOOK_STATS": str(tmp / "stats-paired.json"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    cmd = [sys.executable, __file__, "--worker", "--paired", str(args.paired), "--model", str(args.model),
           "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
           "--max-num-seqs", str(args.max_num_seqs), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    log = tmp / "run-paired.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=1800)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_PAIRED ")), None)
    if line is None:
        raise SystemExit(f"paired run failed, see {log}")
    reps = json.loads(line.removeprefix("BENCH_PAIRED "))
    ratios = []
    for i in range(args.paired):
        on = next(r for r in reps if r["pair"] == i and r["hook"])
        off = next(r for r in reps if r["pair"] == i and not r["hook"])
        ratios.append((on["output_tokens"] / on["seconds"]) / (off["output_tokens"] / off["seconds"]))
    stats_path = tmp / "stats-paired.json"
    hook = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    ratios.sort()
    return {"sender": args.senders[0], "pairs": args.paired, "ratios": ratios, "reps": reps, "hook": hook,
            "loss_pct_median": 100 * (1 - statistics.median(ratios)),
            "loss_pct_q1_q3": [100 * (1 - ratios[(3 * len(ratios)) // 4]), 100 * (1 - ratios[len(ratios) // 4])],
            "tok_s_on": statistics.median(r["output_tokens"] / r["seconds"] for r in reps if r["hook"]),
            "tok_s_off": statistics.median(r["output_tokens"] / r["seconds"] for r in reps if not r["hook"])}


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001
        vllm_version = "?"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        gpu = "none"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "gpu": gpu,
            "python": platform.python_version(), "vllm": vllm_version, "os": platform.platform()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="model dir (default: a tiny model written to a temporary dir)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="concurrent requests (engine batch)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of the workload per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once")
    ap.add_argument("--senders", nargs="+", default=["direct"], choices=["direct", "thread"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="also run N on/off pairs in one process (EngineCore in-process, hook toggled)")
    ap.add_argument("--json", help="write the raw results here")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="wattprint-bench-hook-"))
    if not args.model:
        from wattprint.profiler.twin.tinymodel import write_tiny_model

        args.model = str(write_tiny_model(tmp / "tiny-model"))
    address = f"ipc://{tmp}/sidecar.sock"
    sink = Sink(address)
    variants = ["off", *args.senders]
    runs = []
    started = dt.datetime.now(dt.timezone.utc)
    try:
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else variants[::-1]
            for v in order:
                r = _run_one(args, v, address, tmp, len(runs))
                time.sleep(0.3)
                step_ms = sink.take()
                if step_ms:
                    r["step_ms_median"] = statistics.median(step_ms)
                runs.append(r)
                hook = r.get("hook") or {}
                print(f"# round {rnd} {v:7s} {r['output_tok_s']:9.1f} output tok/s"
                      + (f"  hook median {hook.get('hook_us_median', float('nan')):.1f} us/step"
                         f" over {hook.get('steps')} steps" if v != "off" else ""), file=sys.stderr, flush=True)
        paired = _run_paired(args, address, tmp) if args.paired else None
        sink.take()
    finally:
        sink.close()

    machine = _machine()
    rows = []
    base = statistics.median(r["output_tok_s"] for r in runs if r["variant"] == "off") if runs else None
    for v in variants if runs else ():
        mine = [r for r in runs if r["variant"] == v]
        tok_s = statistics.median(r["output_tok_s"] for r in mine)
        row = {"variant": v, "runs": len(mine), "output_tok_s": tok_s, "loss_pct": 100 * (1 - tok_s / base)}
        hooks = [r["hook"] for r in mine if r.get("hook")]
        if hooks:
            for k in ("hook_us_median", "hook_us_p90", "hook_us_p99", "hook_us_mean", "hook_cpu_us_median",
                      "hook_cpu_us_mean", "requests_per_step_median", "steps"):
                row[k] = statistics.median(h[k] for h in hooks)
            row["errors"] = sum(h["errors"] or 0 for h in hooks)
            row["dropped"] = sum(h["dropped_total"] or 0 for h in hooks)
        rows.append(row)

    cmd = " ".join([".venv/bin/python", "bench/bench_hook_overhead.py", *(argv or sys.argv[1:])])
    print(f"### vLLM step hook overhead ({started:%Y-%m-%d})\n")
    print(f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GiB, GPU: {machine['gpu']}; "
          f"Python {machine['python']}, vLLM {machine['vllm']}")
    print(f"- command: `{cmd}`")
    print(f"- workload: tiny Llama (2 layers, hidden 128, random weights), {args.prompts} prompts x "
          f"{args.max_tokens} output tokens (ignore_eos), max_num_seqs={args.max_num_seqs}, eager, no prefix cache; "
          f"{args.rounds} alternating rounds x {args.reps} timed reps per run; medians")
    step_ms = [r["step_ms_median"] for r in runs if r.get("step_ms_median")]
    if step_ms:
        print(f"- engine step (schedule -> update_from_output, from the records): median {statistics.median(step_ms):.1f} ms")
    print(f"- sidecar: a PULL socket in the bench process; received {sink.records} step records, "
          f"{sink.hellos} hellos, {sink.bad} undecodable\n")
    if runs:
        print("| variant | runs | output tok/s | throughput loss | hook us/step median | p90 | p99 | mean "
              "| hook CPU us/step median | mean | requests/step |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in rows:
            if row["variant"] == "off":
                print(f"| no hook | {row['runs']} | {row['output_tok_s']:.0f} | - | - | - | - | - | - | - | - |")
            else:
                print(f"| hook ({row['variant']} sender) | {row['runs']} | {row['output_tok_s']:.0f} | "
                      f"{row['loss_pct']:.1f} % | {row.get('hook_us_median', float('nan')):.1f} | "
                      f"{row.get('hook_us_p90', float('nan')):.1f} | {row.get('hook_us_p99', float('nan')):.1f} | "
                      f"{row.get('hook_us_mean', float('nan')):.1f} | {row.get('hook_cpu_us_median', float('nan')):.1f} | "
                      f"{row.get('hook_cpu_us_mean', float('nan')):.1f} | "
                      f"{row.get('requests_per_step_median', float('nan')):.0f} |")
        per_run = ", ".join(f"{r['variant']} {r['output_tok_s']:.0f}" for r in runs)
        print(f"\nPer run (output tok/s, in order): {per_run}")
        loads = [x for r in runs for x in r["loadavg_1m"]]
        print(f"1-min load average around the runs: {min(loads):.2f}..{max(loads):.2f} "
              f"(the engine itself keeps ~2 busy; more means other work shared the machine)")
    if paired:
        h = paired["hook"]
        print(f"\nPaired, one process (EngineCore in-process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`), hook "
              f"({paired['sender']} sender) switched on/off between {2 * paired['pairs']} repetitions in ABBA order: "
              f"throughput loss median {paired['loss_pct_median']:.1f} % "
              f"(quartiles {paired['loss_pct_q1_q3'][0]:.1f} .. {paired['loss_pct_q1_q3'][1]:.1f} %), "
              f"{paired['tok_s_on']:.0f} vs {paired['tok_s_off']:.0f} output tok/s; hook {h.get('hook_us_median', 0):.1f} "
              f"us/step median, {h.get('hook_us_mean', 0):.1f} mean, CPU {h.get('hook_cpu_us_median', 0):.1f} median.")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "date": started.isoformat(), "command": cmd,
                                               "rows": rows, "runs": runs, "paired": paired}, indent=2))


if __name__ == "__main__":
    main()
