"""``polyak weights``: a schedule's weights as a table with a bar chart."""

from __future__ import annotations

import argparse

from polyak.cli._args import add_schedule_arguments, schedule_from_args, weights_table

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "weights"
HELP = "print a schedule's weights as a table with a bar chart"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak weights``."""
    add_schedule_arguments(p, positional=True)
    p.add_argument("-n", type=int, default=10, help="number of checkpoints (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run ``polyak weights``: print the weights of ``-n`` checkpoints, oldest first."""
    sched = schedule_from_args(args)
    w = sched.weights(args.n, normalize=args.normalize)
    print(f"{sched!r}, n={args.n} (oldest first):")
    print(weights_table(w))
    return 0
