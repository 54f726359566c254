"""``wattprint tiny-model``: a small random-weight Llama and a tokenizer trained on the fly."""

from __future__ import annotations

import argparse


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from wattprint.profiler.twin.tinymodel import write_tiny_model

    path = write_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model in {path}")
    return 0
