"""``polyak weights``: a schedule's weights as a table with a bar chart."""

from __future__ import annotations

import argparse

from polyak.cli._args import CliError, add_schedule_arguments, schedule_from_args, weights_table

__all__ = ["NAME", "HELP", "MAX_ROWS", "add_arguments", "run"]

NAME = "weights"
HELP = "print a schedule's weights as a table with a bar chart"
# One printed row per checkpoint: beyond this the table is unreadable, and -n 1e11 would
# first allocate 745 GiB of weights.
MAX_ROWS = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak weights``."""
    add_schedule_arguments(p, positional=True)
    p.add_argument("-n", type=int, default=10, help="number of checkpoints (default 10)")


def run(args: argparse.Namespace) -> int:
    """Run ``polyak weights``: print the weights of ``-n`` checkpoints, oldest first."""
    if not 1 <= args.n <= MAX_ROWS:
        raise CliError(f"-n must be between 1 and {MAX_ROWS:,}, got {args.n:,}")
    sched = schedule_from_args(args)
    w = sched.weights(args.n, normalize=args.normalize)
    print(f"{sched!r}, n={args.n} (oldest first):")
    print(weights_table(w))
    return 0
