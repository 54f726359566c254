"""``wattprint sidecar``: receive engine steps, attribute energy online, serve /metrics.

Also the sidecar's part of ``wattprint serve``: its options (:func:`add_arguments`), the sidecar they
describe (:func:`open_sidecar`) and stopping on SIGINT/SIGTERM (:func:`stop_on_signals`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

from wattprint.commands.common import METER_CHOICES
from wattprint.errors import ConfigError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The sidecar's options (``wattprint sidecar`` and ``wattprint serve``); returns ``parser``."""
    from wattprint.profiler.sidecar.access import ENV_OPERATOR_TOKEN
    from wattprint.profiler.transport.messages import ENV_SIDECAR, default_socket

    parser.add_argument("--meter", choices=METER_CHOICES, default="auto",
                        help="energy meter (default: auto - NVML if a GPU is visible, else RAPL, else CPU time)")
    parser.add_argument("--socket", default=None, metavar="PATH",
                        help=f"socket the engine hook sends to (default: ${ENV_SIDECAR}, else {default_socket()}, "
                             "in a private 0700 directory)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics (default: 127.0.0.1)")
    parser.add_argument("--metrics-port", type=int, default=9464, help="port of /metrics (0: any free port; default 9464)")
    parser.add_argument("--ledger", default=None, metavar="PATH",
                        help="append one JSON line per finished request to PATH")
    parser.add_argument("--ledger-mode", default="600", metavar="OCTAL",
                        help="permissions of the ledger (default 600; 640 lets the file's group read it)")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="base of the energy URLs the middleware hands clients (default: the metrics URL)")
    parser.add_argument("--operator-token-file", default=None, metavar="PATH",
                        help=f"private file holding the token that reads every request record "
                             f"(Authorization: Bearer; default: ${ENV_OPERATOR_TOKEN})")
    parser.add_argument("--url-key-file", default=None, metavar="PATH",
                        help="private file holding the key that signs per-request energy URLs (created if "
                             "missing; default: url.key beside the socket)")
    parser.add_argument("--models", default=None, metavar="NAME,...",
                        help="served model names exported as metric labels (others: 'other'; default: the "
                             "first --max-models seen)")
    parser.add_argument("--max-models", type=int, default=16, help="model labels kept (default 16)")
    parser.add_argument("--hardware", default=None, metavar="NAME|PATH",
                        help="hardware profile (default: chosen from the meter's devices)")
    parser.add_argument("--window-s", type=float, default=2.0, help="attribution window in seconds (default 2)")
    return parser


def open_meter(name: str):
    """The meter named by ``--meter`` (imported only when a command runs)."""
    from wattprint.profiler.meters import auto

    return auto.open_meter(name)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse option values the sidecar cannot run with (ConfigError), before anything is opened."""
    if args.window_s <= 0:
        raise ConfigError(f"--window-s must be positive, got {args.window_s}")
    if not (0 <= args.metrics_port <= 65535):
        raise ConfigError(f"--metrics-port must be 0-65535, got {args.metrics_port}")
    ledger_mode(args)
    if args.max_models < 1:
        raise ConfigError(f"--max-models must be at least 1, got {args.max_models}")
    if args.public_url is not None and not args.public_url.startswith(("http://", "https://")):
        raise ConfigError(f"--public-url must be an http:// or https:// URL, got {args.public_url!r}")


def ledger_mode(args: argparse.Namespace) -> int:
    """``--ledger-mode`` as permission bits: owner read-write, group read or read-write, nothing for others."""
    try:
        mode = int(str(args.ledger_mode), 8)
    except ValueError:
        raise ConfigError(f"--ledger-mode must be octal (e.g. 600 or 640), got {args.ledger_mode!r}") from None
    if mode & ~0o660 or mode & 0o600 != 0o600:
        raise ConfigError(f"--ledger-mode {args.ledger_mode} is not allowed: the owner reads and writes, the group "
                          "may read (640) or read and write (660), others get nothing")
    return mode


def open_sidecar(args: argparse.Namespace, meter):
    """The (not yet started) sidecar that ``args`` (:func:`add_arguments`) describe, on ``meter``."""
    from wattprint.profiler.sidecar.access import operator_token_from
    from wattprint.profiler.sidecar.daemon import Sidecar
    from wattprint.profiler.sidecar.paths import load_or_create_key

    key = load_or_create_key(args.url_key_file) if args.url_key_file else None
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    sc = Sidecar(meter, socket_path=args.socket, metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                 ledger_path=args.ledger, ledger_mode=ledger_mode(args), hardware=args.hardware,
                 window_s=args.window_s, url_key=key, operator_token=operator_token_from(args.operator_token_file),
                 models=models, max_models=args.max_models)
    sc.url_key_file = args.url_key_file
    return sc


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while the block runs (the main thread's handlers are restored
    after it; elsewhere signals are left alone)."""
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def close_meter(meter) -> None:
    try:
        meter.close()
    except Exception:  # noqa: BLE001 - closing must not hide the command's own outcome
        log.exception("closing the meter failed")


def run(args: argparse.Namespace, *, ready: Callable | None = None) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code. Raises InputError/ConfigError/MeterError
    (the CLI maps them to exit code 2). ``ready(sidecar)`` is called once it serves (for tests)."""
    from wattprint.profiler.transport.messages import ENV_SIDECAR

    check_arguments(args)
    meter = open_meter(args.meter)
    try:
        with stop_on_signals() as stop, open_sidecar(args, meter) as sidecar:
            print(f"wattprint sidecar: hook address {sidecar.address} "
                  f"(export {ENV_SIDECAR}={sidecar.address} for the engine)", flush=True)
            print(f"wattprint sidecar: metrics {sidecar.metrics_url}/metrics, meter {sidecar.source}, "
                  f"hardware {sidecar.profile.name}" + (f", ledger {args.ledger}" if args.ledger else ""), flush=True)
            if sidecar.lookup_address:
                print(f"wattprint sidecar: answers' energy looked up on {sidecar.lookup_address}", flush=True)
            if ready is not None:
                ready(sidecar)
            while not stop.wait(0.5):
                pass
            print("wattprint sidecar: stopping (settling the last windows)", flush=True)
    finally:
        close_meter(meter)
    return 0
