"""``polyak merge``: average checkpoints on disk into one, in bounded memory."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from polyak.cli._args import (
    CliError,
    add_output_arguments,
    add_progress_arguments,
    add_schedule_arguments,
    output_settings,
    schedule_from_args,
    wants_progress,
    weights_table,
)
from polyak.utils import format_bytes

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "merge"
HELP = "average checkpoints on disk into one, in bounded memory"

_EXAMPLES = """inputs: safetensors files or sharded folders, torch.save files (.pt .pth .bin .ckpt
.pth.tar), Hugging Face model folders (save_pretrained, Trainer checkpoint-N/) and
torch.distributed.checkpoint folders, detected from their content. The output is always
safetensors; for model folders into a folder output, the newest input's config and
tokenizer files are copied too (never optimizer or trainer state).

examples:
  polyak merge run/epoch_*.safetensors -o avg.safetensors --sort natural
  polyak merge run/checkpoint-100 run/checkpoint-200 run/checkpoint-300 -o averaged/
  polyak merge lightning/epoch=*.ckpt -o avg.safetensors --key state_dict --sort natural
  polyak merge ckpt-1000 ckpt-2000 ckpt-3000 -o avg/ --schedule exponential --alpha 2 --dtype bf16
  polyak merge a.safetensors b.safetensors -o avg.safetensors --weights 1,3 --dry-run
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak merge``."""
    p.epilog = _EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "inputs", nargs="+", metavar="IN",
        help="checkpoints of any kind (safetensors, torch files, model folders, DCP), "
        "oldest first",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT",
        help="output: a .safetensors file, or a directory for a sharded checkpoint (torch "
        "file names such as .pt are refused)",
    )  # fmt: skip
    p.add_argument(
        "--key", default=None,
        help="where the weights sit in a nested torch or DCP checkpoint: state_dict "
        "(Lightning), model, state_dict_ema, ...; dotted for deeper nesting",
    )  # fmt: skip
    p.add_argument(
        "--no-copy-files", dest="copy_files", action="store_false",
        help="do not copy config and tokenizer files of model folders into the output",
    )  # fmt: skip
    p.add_argument(
        "--sort", choices=["natural"], default=None,
        help="natural: order numbered names by their numbers (epoch_9 before epoch_10), as a "
        "shell glob does not; default: the order given, with a warning when it is not natural",
    )  # fmt: skip
    add_schedule_arguments(p)
    add_output_arguments(
        p, ["--dtype", "--int-policy", "--accumulate-dtype", "--threads", "--max-shard-size"]
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="validate the inputs and print the plan without writing anything",
    )  # fmt: skip
    p.add_argument(
        "--force", action="store_true",
        help="write into an existing folder that holds no previous polyak output (files "
        "with the output's names are replaced, all others kept)",
    )  # fmt: skip
    add_progress_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Run ``polyak merge``: print the plan (``--dry-run``) or merge and print the report."""
    import polyak
    from polyak import _merge
    from polyak import safetensors as st
    from polyak.checkpoints import ConfigWarning
    from polyak.utils import order_inputs, order_problem

    if args.sort:
        args.inputs = order_inputs(args.inputs, args.sort)
    sched = schedule_from_args(args)
    n = len(args.inputs)
    if sched.name == "explicit" and len(sched.params["weights"]) != n:
        raise CliError(
            f"--weights gives {len(sched.params['weights'])} weights for {n} checkpoints; "
            "give one per checkpoint, oldest first"
        )
    problem = order_problem(args.inputs)
    if problem:
        print(f"polyak: warning: {problem}", file=sys.stderr)
    _note_oldest_weighs_most(sched, n)
    common = dict(
        output_settings(args), normalize=args.normalize, key=args.key,
        copy_files=args.copy_files, force=args.force,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", st.OrderWarning)  # printed above already
        warnings.simplefilter("always", ConfigWarning)
        try:
            if args.dry_run:
                plan, copied = _merge.plan(args.inputs, args.output, sched, **common)
            else:
                progress = wants_progress(args)
                report = polyak.merge(args.inputs, args.output, sched, progress=progress, **common)
        finally:
            for w in caught:
                print(f"polyak: warning: {w.message}", file=sys.stderr)
    if args.dry_run:
        _print_plan(plan, sched, args.inputs)
        if copied:
            print(f"  would copy: {', '.join(copied)}")
        print("  nothing was written")
        return 0
    print(report)
    if report.nonfinite:
        print(
            f"polyak: warning: the inputs hold {report.nonfinite} NaN/Inf values; they are "
            "propagated into the output, not repaired",
            file=sys.stderr,
        )
    return 0


def _note_oldest_weighs_most(sched: Any, n: int) -> None:
    """Say so when the oldest input gets the largest weight: what ``ema`` does over a few
    checkpoints (it starts from its first snapshot), rarely what "recent weighs most" meant."""
    from polyak import weights

    w = [float(x) for x in weights(sched, n)]
    if n < 2 or w[0] <= max(w[1:]):
        return
    shown = ", ".join(f"{x:.3g}" for x in w)
    print(
        f"polyak: note: {sched!r} gives the OLDEST input the largest weight over these {n} "
        f"checkpoints (weights, oldest first: {shown}). For recent checkpoints weighing most, "
        "use --schedule exponential (or linear)",
        file=sys.stderr,
    )


def _print_plan(plan: Any, sched: Any, inputs: Sequence[str]) -> None:
    from polyak.safetensors._results import current_rss

    kinds: dict[str, int] = {}
    for _, dtype, _, _ in plan.tensors:
        kinds[dtype] = kinds.get(dtype, 0) + 1
    casts = {f"{a} -> {b}" for _, a, b, _ in plan.tensors if a != b}
    print(f"plan: merge {len(plan.inputs)} checkpoints into {plan.outputs[0]} (dry run)")
    print(f"  inputs: all {len(plan.inputs)} valid and matching")
    print(
        f"  tensors: {len(plan.tensors)} ("
        + ", ".join(f"{c} {d}" for d, c in sorted(kinds.items()))
        + ")"
        + (f"; casting {', '.join(sorted(casts))}" if casts else "")
    )
    print(
        f"  to read: {format_bytes(plan.bytes_to_read)}   "
        f"to write: {format_bytes(plan.bytes_to_write[0])}"
    )
    print(f"  schedule: {sched!r}")
    print("  weights (oldest first):")
    names = [os.path.basename(os.path.normpath(p)) for p in inputs]
    print(weights_table(plan.weights[0], names))
    base = current_rss()
    peak = plan.peak_memory_estimate(base)
    print(
        f"  peak memory: about {format_bytes(peak)} ({plan.threads} threads x "
        f"{format_bytes(plan.buffer_bytes / plan.threads)} of buffers + {format_bytes(base)} "
        "for Python), independent of the model size and of the number of inputs"
    )
