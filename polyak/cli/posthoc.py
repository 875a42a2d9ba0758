"""``polyak posthoc``: power EMAs of any sigma_rel rebuilt from post-hoc EMA snapshots (EDM2)."""

from __future__ import annotations

import argparse
import os

import numpy as np

from polyak.cli._args import (
    CliError,
    add_output_arguments,
    add_progress_arguments,
    output_settings,
    parse_numbers,
    wants_progress,
    weights_table,
)

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "posthoc"
HELP = "reconstruct power EMAs of any sigma_rel from post-hoc EMA snapshots (EDM2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak posthoc``."""
    p.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="snapshot directories (polyak.SnapshotDir), or a parent holding one per EMA",
    )
    p.add_argument(
        "--sigma-rel",
        required=True,
        metavar="S1,S2,...",
        help="relative EMA widths to reconstruct, each in (0, 0.2887), e.g. 0.05,0.08,0.12",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="directory receiving one ema-sigma_rel-<S>.safetensors per value",
    )
    p.add_argument(
        "-t",
        "--t",
        dest="t",
        type=float,
        default=None,
        help="the step to reconstruct at (default: the last snapshot's)",
    )
    add_output_arguments(p, ["--dtype", "--accumulate-dtype", "--threads"])
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="find the snapshots and print the coefficients without writing anything",
    )
    add_progress_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``polyak posthoc``: solve for the coefficients, then print or write the EMAs."""
    from polyak import posthoc
    from polyak.schedules import sigma_rel_to_gamma

    sigmas = parse_numbers(args.sigma_rel)
    if not sigmas:
        raise CliError(f"--sigma-rel needs at least one value, got {args.sigma_rel!r}")
    names = [f"ema-sigma_rel-{s:g}.safetensors" for s in sigmas]
    if len(set(names)) != len(names):
        raise CliError(f"--sigma-rel repeats a value: {args.sigma_rel!r}")
    found = posthoc.find_snapshots(args.dirs)
    t_end = args.t if args.t is not None else max(t for _, t, _ in found)
    print(
        f"{len(found)} snapshots, t from {min(t for _, t, _ in found):g} to "
        f"{max(t for _, t, _ in found):g}, gamma in "
        f"{sorted({round(g, 3) for _, _, g in found})}"
    )
    # Solved here first (it is cheap) so that bad values fail before OUTDIR is created.
    coef = posthoc.solve([(t, g) for _, t, g in found], sigmas, args.t)
    if args.dry_run:
        labels = [os.path.relpath(p) for p, _, _ in found]
        for k, s in enumerate(sigmas):
            print(f"sigma_rel={s:g} (gamma={sigma_rel_to_gamma(s):.4f}) at t={t_end:g}:")
            print(weights_table(coef[:, k], labels))
        print("nothing was written")
        return 0
    os.makedirs(args.output, exist_ok=True)
    outputs = [os.path.join(args.output, name) for name in names]
    coef = posthoc.reconstruct(
        args.dirs,
        outputs,
        sigma_rel=sigmas,
        t=args.t,
        progress=wants_progress(args),
        **output_settings(args),
    )
    for k, (s, out) in enumerate(zip(sigmas, outputs, strict=True)):
        print(
            f"wrote {out}: sigma_rel={s:g} (gamma={sigma_rel_to_gamma(s):.4f}) at t={t_end:g}, "
            f"sum |coefficients| = {float(np.abs(coef[:, k]).sum()):.3f}"
        )
    return 0
