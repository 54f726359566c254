"""``wattprint demo``: the README's main job on an embedded default.

Builds the tiny model if absent, serves it with vLLM and the sidecar (the best meter available: NVML
with a GPU, else the simulated twin - said loudly), sends a mixed workload through the OpenAI API
(short and long prompts, every stratum) with a small access policy at work
(``configs/policy-demo.yaml``: the agentic stratum's budget runs out and its later requests get 429),
prints a per-request table, the totals and the policy's table by stratum and class, and leaves
``requests.jsonl``, ``summary.json``, ``metrics.prom``, ``ledger.jsonl`` and ``report.html`` in the
output directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from wattprint.commands.common import METER_CHOICES

SERVED_NAME = "wattprint-tiny-llama"
POLICY_FILE = "policy-demo.yaml"  # in configs/
REFUSED = "refused"
WORDS = ("energy joules prefill decode cache tokens power watts model request server batch step kernel "
         "memory bandwidth compute science health agent").split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(seed: int = 0) -> list[tuple[str, str, int, str | None, str]]:
    """(name, prompt, max_tokens, stratum, how) - short and long prompts, every stratum; the stratum is
    sent in the body (``vllm_xargs``) or as the ``X-Wattprint-Stratum`` header."""
    import random

    rnd = random.Random(seed)
    out = []
    strata = ["critical", "science", "productive", "agentic", None]
    for i, stratum in enumerate(strata * 3):
        long = i % 3 == 2
        n_words = rnd.randint(600, 1100) if long else rnd.randint(5, 40)
        prompt = " ".join(rnd.choice(WORDS) for _ in range(n_words))
        max_tokens = rnd.choice([8, 32, 64, 128])
        how = "header" if i % 2 else "body"
        out.append((f"{stratum or 'none'}-{'long' if long else 'short'}-{i}", prompt, max_tokens, stratum, how))
    return out


def _wait_health(url: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}; its log ends:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the vLLM server did not become healthy in {timeout_s:.0f} s (log: {log_path})")


def run_demo(args) -> int:
    import msgspec
    from rich.console import Console
    from rich.panel import Panel

    from wattprint.commands.output import check_conservation, summary_dict, write_requests, write_summary
    from wattprint.commands.serve import has_nvidia_gpu, policy_env, server_command, server_env, stop_server
    from wattprint.configs import config_dir
    from wattprint.exporters.policy_metrics import PolicyCollector
    from wattprint.exporters.prometheus import make_registry
    from wattprint.exporters.report import print_report
    from wattprint.exporters.report_html import write_report
    from wattprint.files import atomic_write, open_private, private_dir
    from wattprint.profiler.core.hardware import load_profile
    from wattprint.profiler.meters.auto import open_meter
    from wattprint.profiler.sidecar.daemon import Sidecar
    from wattprint.profiler.sidecar.totals import add_totals
    from wattprint.profiler.twin.tinymodel import is_complete, write_tiny_model

    console = Console()
    out = private_dir(args.out)
    console.rule("[bold]wattprint demo")
    model_dir = Path(args.model) if args.model else out / "tiny-model"
    if not is_complete(model_dir):
        with console.status(f"writing a tiny random-weight Llama and training its tokenizer in {model_dir} ..."):
            write_tiny_model(model_dir, seed=args.seed)
    gpu = has_nvidia_gpu() and args.meter in ("auto", "nvml")
    meter_name = args.meter if args.meter != "auto" else ("nvml" if gpu else "simulated")
    if meter_name == "simulated":
        console.print(Panel(
            "No GPU energy counter here: the joules below come from wattprint's [bold]simulated H100 twin[/], "
            "driven by the real vLLM engine's steps. They are labelled [bold]simulated[/] everywhere and are "
            "NOT measurements. On a GPU machine the demo reads the NVML energy counter instead.",
            title="[bold yellow]SIMULATED ENERGY", border_style="yellow"))
    meter = open_meter(meter_name)
    hardware = args.hardware or ("h100-sxm" if meter_name == "simulated" else None)
    sock = os.path.join(tempfile.mkdtemp(prefix="wattprint-demo-"), "sidecar.sock")
    port = _free_port()
    log_path = out / "vllm-server.log"
    vllm_args = ["--model", str(model_dir), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
                 "--port", str(port), "--max-model-len", "4096", "--max-num-batched-tokens", "512",
                 "--max-num-seqs", "16", "--seed", str(args.seed), "--disable-log-stats"]
    if not gpu:
        vllm_args += ["--gpu-memory-utilization", "0.25", "--enforce-eager"]
    results = {}
    policy_path = config_dir() / POLICY_FILE
    stats_dir = tempfile.mkdtemp(prefix="wattprint-policy-")  # 0700: the middleware's decision counts
    policy_settings = SimpleNamespace(policy=str(policy_path), energy_wait_ms=100.0, energy_timeout_ms=200.0)
    sc = Sidecar(meter, socket_path=sock, metrics_port=0, ledger_path=out / "ledger.jsonl", hardware=hardware,
                 window_s=1.0, collectors=[PolicyCollector(stats_dir)])
    with sc:
        console.print(f"sidecar: metrics {sc.metrics_url}/metrics, meter [bold]{sc.source}[/], "
                      f"hardware profile {sc.profile.name}, policy {policy_path}")
        env = {**server_env(sc), **policy_env(policy_settings, vllm_args, stats_dir)}
        with open_private(log_path) as log:
            proc = subprocess.Popen(server_command(vllm_args), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            with console.status(f"starting the vLLM OpenAI server on port {port} (log: {log_path}) ..."):
                _wait_health(f"http://127.0.0.1:{port}/health", proc, args.timeout_s, log_path)
            t_workload = time.monotonic()  # the steps' clock
            everything = _send_workload(console, port, workload(args.seed))
            sent = {n: v for n, v in everything.items() if v[0] != REFUSED}
            refused = {n: v[1] for n, v in everything.items() if v[0] == REFUSED}
            with console.status("settling the last energy windows ..."):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    results = {name: sc.lookup(rid) for name, (rid, _) in sent.items()}
                    if all(r is not None and r.status == "final" for r in results.values()):
                        break
                    time.sleep(0.25)
            window, upto = sc.driver.window_from(t_workload)
        finally:
            stop_server(proc)
            time.sleep(1.2)  # the middleware's last decision counts (written once a second) reach /metrics
        snap = sc.snapshot()
        exposition = _exposition(make_registry(lambda: snap, sc.collectors))
    shutil.rmtree(stats_dir, ignore_errors=True)
    whole = _merged(snap.model_totals.values(), add_totals)
    totals = window_totals(window, whole) if window is not None and whole is not None else whole
    upto = upto if totals is not whole else None
    rows = [r for r in results.values() if r is not None]
    missing = [n for n, r in results.items() if r is None or r.status != "final"]
    if totals is not None:  # the table shows the workload's names; the files keep the OpenAI ids
        named = [msgspec.structs.replace(r, id=n) for n, r in results.items() if r is not None]
        print_report(named, totals, limit=0, console=console)
        check_conservation(totals, rows)  # over the totals and the request records: exit 3 if violated
        console.print(_window_note(totals, upto))
    write_requests(out / "requests.jsonl", rows)
    summary = write_summary(out / "summary.json", totals, whole_run=summary_dict(whole),
                  window="workload" if totals is not whole else "whole run", meter=snap.source,
                  hardware=load_profile(hardware).name if hardware else None, model=SERVED_NAME,
                  model_dir=str(model_dir), model_config=str((model_dir / "config.json").resolve()),
                  requests_sent=len(results), requests_final=len(results) - len(missing),
                  device_names=snap.device_names)
    atomic_write(out / "metrics.prom", exposition)
    report = write_report(out / "report.html", requests=rows, summary=summary, notes=[
        "attributed online by the sidecar; per-step figures need a recorded trace (wattprint profile)"])
    _print_policy(console, policy_path, out / "ledger.jsonl", refused)
    console.print(f"files in {out}/: requests.jsonl summary.json metrics.prom ledger.jsonl vllm-server.log")
    console.print(f"report: {report}")
    if missing:
        console.print(f"[red]{len(missing)} request(s) have no final energy record: {', '.join(missing)}")
        return 1
    return 0


def _print_policy(console, policy_path: Path, ledger: Path, refused: dict[str, str | None]) -> None:
    """What the policy did live (the requests the middleware refused with 429) and its audit of the
    ledger: energy, classes and decisions by stratum, and when budgets ran out."""
    from wattprint.commands.policy import print_audit
    from wattprint.profiler.policy.audit import audit, read_ledger_records
    from wattprint.profiler.policy.config import load_policy

    console.rule("[bold]access policy")
    for name, retry_after in sorted(refused.items()):
        console.print(f"refused by the policy (429, Retry-After {retry_after or '?'} s): {name}")
    if not refused:
        console.print("no request was refused (the agentic stratum's first answer had not spent its budget yet)")
    policy = load_policy(policy_path)
    contents = read_ledger_records(ledger)
    result = audit(contents.records, policy, torn_bytes=contents.torn_bytes)
    print_audit(result, policy, str(ledger), str(policy_path), console=console)


def window_totals(window: dict, whole):
    """The workload's totals: the whole run's less what was settled before the workload (the history's
    difference), with the whole run's source and coefficients; no per-stratum breakdowns."""
    from wattprint.profiler.core.results import Totals

    ints = ("requests", "steps")
    fields = {k: (int(round(v)) if k in ints else v) for k, v in window.items() if k not in ("t_from_s", "t_to_s")}
    return Totals(source=whole.source, t_start=window["t_from_s"], t_end=window["t_to_s"],
                  coefficients=whole.coefficients, **fields)


def _window_note(totals, upto: dict | None) -> str:
    if upto is None:
        return ("[yellow]the totals include the server's start-up (the sidecar had not settled it before the "
                "workload began)")
    before_j = upto["measured_j"] - totals.measured_j
    return (f"the totals cover the workload ({totals.t_end - totals.t_start:,.1f} s); before it, the server's "
            f"start-up: {before_j:,.1f} J measured, {upto['attributed_j'] - totals.attributed_j:,.3f} J of it "
            "to requests; the whole run is in summary.json (whole_run)")


def _merged(totals, add):
    """The sum of several models' totals (None when there are none)."""
    out = None
    for t in totals:
        out = t if out is None else add(out, t)
    return out


def _exposition(registry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)


def _send_workload(console, port: int, items) -> dict[str, tuple[str, object]]:
    """Send the requests (4 at a time) through the OpenAI client; returns name -> (response id, tokens),
    or (REFUSED, Retry-After) for a request the access policy refused."""
    from openai import OpenAI, RateLimitError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wattprint-demo", max_retries=0, timeout=300)

    def one(item):
        name, prompt, max_tokens, stratum, how = item
        extra_body, headers = {}, {}
        if stratum and how == "body":
            extra_body["vllm_xargs"] = {"stratum": stratum}
        elif stratum:
            headers["X-Wattprint-Stratum"] = stratum
        try:
            r = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens,
                                          temperature=0.8, extra_body=extra_body or None,
                                          extra_headers=headers or None)
        except RateLimitError as exc:
            return name, (REFUSED, exc.response.headers.get("retry-after"))
        return name, (r.id, r.usage.completion_tokens if r.usage else 0)

    sent = {}
    with Progress(SpinnerColumn(), TextColumn("sending requests through the OpenAI API"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("requests", total=len(items))
        with ThreadPoolExecutor(4) as pool:
            for name, value in pool.map(one, items):
                sent[name] = value
                progress.advance(task)
    return sent


def add_arguments(d) -> None:
    d.add_argument("--out", default="wattprint-demo", help="output directory")
    d.add_argument("--meter", default="auto", choices=METER_CHOICES,
                   help="auto: NVML with a GPU, else the simulated twin")
    d.add_argument("--model", default=None, help="model directory to serve (default: build the tiny model)")
    d.add_argument("--hardware", default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--timeout-s", type=float, default=420.0, help="how long the server may take to start")


run = run_demo
