"""The ``polyak`` command line: merge, inspect, weights, demo and posthoc.

Each subcommand is a pair of functions, one adding its arguments and one running it, listed
once in :data:`COMMANDS`; a new subcommand is one more entry there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["main", "COMMANDS", "add_schedule_arguments", "schedule_from_args"]

# flag -> (keyword of polyak.schedules.get, type, help)
_SCHEDULE_PARAMS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "--alpha": ("alpha", float, "exponential: each older checkpoint weighs exp(-1/ALPHA) of "
                "the next (default 2)"),
    "--decay": ("decay", float, "ema, ema_warmup: weight of the old average at each step"),
    "--last": ("k", int, "tail: average only the last K checkpoints"),
    "--fraction": ("fraction", float, "tail: average only the last FRACTION of checkpoints"),
    "--start": ("start", int, "swa: 0-based index of the first checkpoint to average"),
    "--eta": ("eta", float, "polynomial: decay(t) = 1 - (ETA + 1) / (t + ETA)"),
    "--gamma": ("gamma", float, "power: EDM2 power-function EMA exponent"),
    "--sigma-rel": ("sigma_rel", float, "power: relative EMA width, instead of --gamma"),
    "--inv-gamma": ("inv_gamma", float, "ema_warmup: inverse multiplicative warmup factor"),
    "--power": ("power", float, "ema_warmup: warmup exponent"),
    "--min-decay": ("min_decay", float, "ema_warmup: smallest decay"),
}  # fmt: skip
# A parameter given without --schedule picks the schedule it belongs to.
_IMPLIED = {
    "k": "tail",
    "fraction": "tail",
    "decay": "ema",
    "alpha": "exponential",
    "start": "swa",
    "eta": "polynomial",
    "gamma": "power",
    "sigma_rel": "power",
}


class CliError(Exception):
    """A usage problem found after parsing (printed as ``polyak: error: ...``)."""


def add_schedule_arguments(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Add ``--schedule`` (or a positional SCHEDULE), its parameters and ``--weights``.

    The parameter flags (``--decay``, ``--last``, ...) come from one table shared by every
    subcommand; :func:`schedule_from_args` turns the parsed values into a schedule.

    Args:
        parser: the (sub)command parser to extend, in a group titled "schedule".
        positional: take the schedule name as an optional positional argument (``polyak
            weights ema``) instead of ``-s/--schedule``.

    Raises:
        argparse.ArgumentError: ``parser`` already has one of these flags.

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser()
        >>> add_schedule_arguments(p)
        >>> schedule_from_args(p.parse_args(["--decay", "0.9"]))
        ema(decay=0.9)
    """
    group = parser.add_argument_group("schedule")
    if positional:
        group.add_argument(
            "schedule", nargs="?", default=None,
            help="schedule name (equal, linear, exponential, ema, tail, swa, polynomial, power, "
            "ema_warmup) or comma-separated weights; default equal",
        )  # fmt: skip
    else:
        group.add_argument(
            "-s", "--schedule", default=None,
            help="schedule name: equal (default), linear, exponential, ema, tail, swa, "
            "polynomial, power, ema_warmup",
        )  # fmt: skip
    for flag, (key, typ, text) in _SCHEDULE_PARAMS.items():
        metavar = "K" if key == "k" else key.upper()
        group.add_argument(flag, dest=f"sp_{key}", type=typ, metavar=metavar, help=text)
    group.add_argument(
        "--weights", default=None, metavar="W1,W2,...",
        help="explicit weights, one per checkpoint, oldest first (instead of a schedule)",
    )  # fmt: skip
    group.add_argument(
        "--no-normalize", dest="normalize", action="store_false",
        help="use the weights as given instead of dividing them by their sum",
    )  # fmt: skip


def _parse_weights(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CliError(f"weights must be comma-separated numbers, got {text!r}") from None


def schedule_from_args(args: argparse.Namespace) -> Any:
    """The schedule the arguments describe (a :class:`polyak.Schedule`).

    A parameter given without a schedule name picks the schedule it belongs to (``--last 3``
    is ``tail``); comma-separated numbers in place of a name are explicit weights.

    Args:
        args: parsed arguments of a parser set up by :func:`add_schedule_arguments`.

    Returns:
        The schedule; ``equal`` when nothing is given.

    Raises:
        CliError: ``--weights`` together with a schedule, parameters of different schedules,
            a flag the schedule does not take, or a required one missing (naming the flags).
        ScheduleError: a parameter value out of range (from :func:`polyak.schedules.get`).

    Example:
        >>> import argparse
        >>> p = argparse.ArgumentParser()
        >>> add_schedule_arguments(p, positional=True)
        >>> schedule_from_args(p.parse_args(["linear"]))
        linear()
        >>> schedule_from_args(p.parse_args(["--last", "3"]))
        tail(k=3)
    """
    from polyak import schedules

    params = {
        key: getattr(args, f"sp_{key}")
        for key, _, _ in _SCHEDULE_PARAMS.values()
        if getattr(args, f"sp_{key}", None) is not None
    }
    name = args.schedule
    weights_text = args.weights
    if name is not None and ("," in name or _is_number(name)):
        weights_text, name = name, None  # `polyak weights 1,2,3`: explicit weights
    if weights_text is not None:
        if name is not None or params:
            raise CliError("give either --weights or a schedule with its parameters, not both")
        return schedules.explicit(_parse_weights(weights_text))
    if name is None:
        implied = {_IMPLIED[k] for k in params if k in _IMPLIED}
        if len(implied) > 1:
            raise CliError(
                f"parameters {sorted(params)} belong to different schedules; pass --schedule"
            )
        name = implied.pop() if implied else "equal"
    _check_schedule_params(name, params)
    return schedules.get(name, **params)


def _check_schedule_params(name: str, params: dict[str, Any]) -> None:
    """Name the flags when parameters do not fit the schedule (the factory's TypeError names
    keyword arguments, which a command-line user never typed)."""
    import inspect

    from polyak import schedules

    key = name.strip().lower().replace("-", "_")
    if key == "explicit":
        raise CliError("for explicit weights, pass --weights W1,W2,... (one per checkpoint)")
    if key not in schedules.names():
        return  # schedules.get names the known ones
    flags = {k: flag for flag, (k, _, _) in _SCHEDULE_PARAMS.items()}
    sig = inspect.signature(getattr(schedules, key))
    takes = [p for p in sig.parameters.values() if p.name in flags]
    wrong = sorted(flags[k] for k in params if k not in sig.parameters)
    if wrong:
        accepted = ", ".join(flags[p.name] for p in takes) or "no parameters"
        raise CliError(
            f"{', '.join(wrong)} does not apply to schedule {key!r} (it takes {accepted})"
        )
    missing = [flags[p.name] for p in takes if p.default is p.empty and p.name not in params]
    if missing:
        raise CliError(f"schedule {key!r} needs {', '.join(missing)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _human(n: float) -> str:
    from polyak.safetensors._merge import _human as human

    return human(n)


def _weights_table(
    w: Sequence[float], labels: Sequence[str] | None = None, width: int = 40
) -> str:
    """Weights as rows of index, label, value and a text bar scaled to the largest."""
    top = max((abs(x) for x in w), default=0.0) or 1.0
    rows = []
    lab = list(labels) if labels is not None else [""] * len(w)
    lab_width = max((len(s) for s in lab), default=0)
    for i, (x, name) in enumerate(zip(w, lab, strict=True)):
        bar = ("#" if x >= 0 else "-") * round(abs(x) / top * width)
        rows.append(f"  {i:>4}  {name:<{lab_width}}  {x:>10.6f}  {bar}".rstrip())
    rows.append(f"  {'sum':>4}  {'':<{lab_width}}  {float(np.sum(w)):>10.6f}")
    return "\n".join(rows)


# -- merge ------------------------------------------------------------------------------------
_MERGE_EXAMPLES = """examples:
  polyak merge run/epoch_*.safetensors -o avg.safetensors
  polyak merge ckpt-1000 ckpt-2000 ckpt-3000 -o avg/ --schedule ema --decay 0.9 --dtype bf16
  polyak merge a.safetensors b.safetensors -o avg.safetensors --weights 1,3 --dry-run
"""


def _add_merge(p: argparse.ArgumentParser) -> None:
    p.epilog = _MERGE_EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IN",
        help="checkpoints (.safetensors files or sharded directories), oldest first",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="output: a .safetensors file, or a directory for a sharded checkpoint",
    )
    add_schedule_arguments(p)
    p.add_argument(
        "--dtype",
        default=None,
        help="cast float tensors of the output: bf16, fp16, fp32, fp64, fp8_e4m3 or fp8_e5m2 "
        "(default: keep each tensor's dtype)",
    )
    p.add_argument(
        "--int-policy",
        default="last",
        choices=["last", "first", "average", "error"],
        help="integer/bool tensors: take the last (default), first, average, or fail",
    )
    p.add_argument(
        "--accumulate-dtype",
        default=None,
        metavar="DTYPE",
        help="accumulate in this dtype, e.g. float64 (default: float32, float64 for float64)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="worker threads (default: the usable cores, at most 8)",
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="for a directory OUT: largest shard, e.g. 5GB (10**9 bytes) or 2GiB "
        "(default: the first input's shard layout)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the inputs and print the plan without writing anything",
    )
    add_progress_arguments(p)


def add_progress_arguments(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: a bar when stderr is a terminal)."""
    prog = p.add_mutually_exclusive_group()
    prog.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    prog.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show a progress bar"
    )


def cmd_merge(args: argparse.Namespace) -> int:
    from polyak.safetensors import _merge

    sched = schedule_from_args(args)
    n = len(args.inputs)
    if sched.name == "explicit" and len(sched.params["weights"]) != n:
        raise CliError(
            f"--weights gives {len(sched.params['weights'])} weights for {n} checkpoints; "
            "give one per checkpoint, oldest first"
        )
    w = sched.weights(n, normalize=args.normalize)
    problem = _merge.natural_order_problem(args.inputs)
    if problem:
        print(f"polyak: warning: {problem}", file=sys.stderr)
    common = dict(
        dtype=args.dtype, int_policy=args.int_policy, accumulate_dtype=args.accumulate_dtype,
        threads=args.threads, max_shard_size=args.max_shard_size,
    )  # fmt: skip
    if args.dry_run:
        plan = _merge.plan_merge(
            args.inputs, [args.output], [w], normalize=False, schedules=[sched], **common
        )
        _print_plan(plan, sched, args.inputs)
        return 0
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _merge.OrderWarning)  # printed above already
        (report,) = _merge.merge_many(
            args.inputs, [args.output], [w], normalize=False, progress=progress,
            schedules=[sched], **common,
        )  # fmt: skip
    print(report)
    return 0


def _print_plan(plan: Any, sched: Any, inputs: Sequence[str]) -> None:
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
    print(f"  to read: {_human(plan.bytes_to_read)}   to write: {_human(plan.bytes_to_write[0])}")
    print(f"  schedule: {sched!r}")
    print("  weights (oldest first):")
    names = [os.path.basename(os.path.normpath(p)) for p in inputs]
    print(_weights_table(plan.weights[0], names))
    base = _current_rss()
    peak = plan.peak_memory_estimate(base)
    print(
        f"  peak memory: about {_human(peak)} ({plan.threads} threads x "
        f"{_human(plan.buffer_bytes / plan.threads)} of buffers + {_human(base)} for Python), "
        "independent of the model size and of the number of inputs"
    )
    print("  nothing was written")


def _current_rss() -> int:
    from polyak.safetensors._merge import _current_rss as rss

    return rss()


# -- inspect ----------------------------------------------------------------------------------
def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", help="a .safetensors file or sharded directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_inspect(args: argparse.Namespace) -> int:
    import math

    from polyak.safetensors import Checkpoint

    with Checkpoint(args.checkpoint) as ck:
        rows = []
        for name in ck.keys():
            info = ck.tensor_info(name)
            rows.append((name, info.code, info.shape, info.nbytes, math.prod(info.shape)))
        meta = dict(ck.metadata or {})
        layout = ck.layout()
        sharded = ck.sharded
    if args.json:
        out = {
            "path": args.checkpoint,
            "shards": [f for f, _ in layout] if sharded else None,
            "tensors": [
                {"name": n, "dtype": d, "shape": list(s), "nbytes": b} for n, d, s, b, _ in rows
            ],
            "metadata": meta,
        }
        print(json.dumps(out, indent=2))
        return 0
    kind = f"sharded checkpoint, {len(layout)} shards" if sharded else "safetensors file"
    print(f"{args.checkpoint}: {kind}")
    if sharded:
        sizes = {name: nbytes for name, _, _, nbytes, _ in rows}
        width = max(len(f) for f, _ in layout)
        for shard, names in layout:
            total = _human(sum(sizes[n] for n in names))
            print(f"  {shard:<{width}}  {len(names):>6} tensors  {total:>10}")
    wn = max([len(r[0]) for r in rows] + [6])
    ws = max([len(str(list(r[2]))) for r in rows] + [5])
    print(f"  {'tensor':<{wn}}  {'dtype':<7}  {'shape':<{ws}}  {'size':>10}")
    for name, code, shape, nbytes, _ in rows:
        print(f"  {name:<{wn}}  {code:<7}  {str(list(shape)):<{ws}}  {_human(nbytes):>10}")
    total = sum(r[3] for r in rows)
    params = sum(r[4] for r in rows)
    print(f"  {len(rows)} tensors, {params:,} elements, {_human(total)}")
    if meta:
        print("  metadata:")
        for k, v in meta.items():
            if k == "polyak":
                try:
                    v = json.dumps(json.loads(v))
                except ValueError:
                    pass
            print(f"    {k}: {v if len(v) <= 200 else v[:197] + '...'}")
    return 0


# -- weights ----------------------------------------------------------------------------------
def _add_weights(p: argparse.ArgumentParser) -> None:
    add_schedule_arguments(p, positional=True)
    p.add_argument("-n", type=int, default=10, help="number of checkpoints (default 10)")


def cmd_weights(args: argparse.Namespace) -> int:
    sched = schedule_from_args(args)
    w = sched.weights(args.n, normalize=args.normalize)
    print(f"{sched!r}, n={args.n} (oldest first):")
    print(_weights_table(w))
    return 0


# -- demo -------------------------------------------------------------------------------------
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help="folder with checkpoints to use, or where to generate them "
                   "(default: a temporary folder, removed afterwards)")  # fmt: skip
    p.add_argument("-n", type=int, default=5, help="checkpoints to generate (default 5)")


def make_demo_checkpoints(folder: str, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` small checkpoints of a fake training run (float32, bf16, a step counter)."""
    import ml_dtypes

    from polyak.safetensors import save

    rng = np.random.default_rng(seed)
    target = {
        "encoder.weight": rng.standard_normal((512, 512)).astype(np.float32),
        "encoder.bias": rng.standard_normal(512).astype(np.float32),
        "head.weight": rng.standard_normal((256, 512)).astype(np.float32),
    }
    paths = []
    for i in range(1, n + 1):
        noise = 1.0 / i  # later checkpoints sit closer to the optimum, as in training
        tree = {
            "encoder.weight": target["encoder.weight"]
            + noise * rng.standard_normal((512, 512)).astype(np.float32),
            "encoder.bias": target["encoder.bias"]
            + noise * rng.standard_normal(512).astype(np.float32),
            "head.weight": (
                target["head.weight"] + noise * rng.standard_normal((256, 512)).astype(np.float32)
            ).astype(ml_dtypes.bfloat16),
            "step": np.array(1000 * i, dtype=np.int64),
        }
        path = os.path.join(folder, f"step_{1000 * i}.safetensors")
        save(tree, path, {"format": "np", "step": str(1000 * i)})
        paths.append(path)
    return paths


def cmd_demo(args: argparse.Namespace) -> int:
    import polyak
    from polyak.safetensors import _merge, load

    if args.n < 1:
        raise CliError(f"-n must be at least 1, got {args.n}")
    own = args.dir is None
    folder = tempfile.mkdtemp(prefix="polyak-demo-") if own else args.dir
    try:
        os.makedirs(folder, exist_ok=True)
        found = sorted(
            (os.path.join(folder, f) for f in os.listdir(folder)
             if f.endswith(".safetensors") and not f.startswith("merged")),
            key=lambda p: _merge._natural_key(os.path.basename(p)),
        )  # fmt: skip
        if found:
            paths = found
            print(f"using {len(paths)} checkpoints in {folder}")
        else:
            paths = make_demo_checkpoints(folder, args.n)
            size = sum(os.path.getsize(p) for p in paths)
            print(f"generated {len(paths)} checkpoints in {folder} ({_human(size)} in all)")
        names = [os.path.basename(p) for p in paths]
        demo = [("equal", ["--schedule", "equal"]), ("linear", ["--schedule", "linear"]),
                ("exponential", ["--schedule", "exponential", "--alpha", "2"])]  # fmt: skip
        for label, _ in demo:
            sched = polyak.schedules.get(
                label, **({"alpha": 2.0} if label == "exponential" else {})
            )
            print(f"\n{sched!r} weights (oldest first):")
            print(_weights_table(sched.weights(len(paths)), names))
        trees = [load(p) for p in paths]
        worst = 0.0
        for label, flags in demo:
            out = os.path.join(folder, f"merged_{label}.safetensors")
            argv = ["merge", *paths, "-o", out, *flags, "--no-progress"]
            shown = [os.path.basename(a) if a.startswith(folder) else a for a in argv]
            print(f"\n$ polyak {' '.join(shown)}    (in {folder})")
            code = main(argv)
            if code != 0:
                return code
            sched = polyak.schedules.get(
                label, **({"alpha": 2.0} if label == "exponential" else {})
            )
            expected = polyak.average(trees, sched)
            got = load(out)
            err = max(
                float(np.max(np.abs(got[k].astype(np.float64) - expected[k].astype(np.float64))))
                if got[k].size
                else 0.0
                for k in expected
            )
            same = all(got[k].tobytes() == np.asarray(expected[k]).tobytes() for k in expected)
            worst = max(worst, err)
            print(
                f"  check against polyak.average in memory: max abs error {err:.3g}"
                + (" (bit for bit identical)" if same else "")
            )
        print(f"\ndone: {len(demo)} merges, max error {worst:.3g}")
        if worst != 0.0:
            print(
                f"polyak: error: a streamed merge differs from polyak.average by {worst:.3g}",
                file=sys.stderr,
            )
            return 1
        return 0
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)


# -- posthoc ---------------------------------------------------------------------------------
def _add_posthoc(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--dtype", default=None, help="cast float tensors of the outputs, e.g. bf16")
    p.add_argument("--accumulate-dtype", default=None, help="e.g. float64 for extra precision")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: cores)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="find the snapshots and print the coefficients without writing anything",
    )
    add_progress_arguments(p)


def cmd_posthoc(args: argparse.Namespace) -> int:
    from polyak import posthoc
    from polyak.schedules import sigma_rel_to_gamma

    sigmas = _parse_weights(args.sigma_rel)
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
            print(_weights_table(coef[:, k], labels))
        print("nothing was written")
        return 0
    os.makedirs(args.output, exist_ok=True)
    outputs = [os.path.join(args.output, name) for name in names]
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    coef = posthoc.reconstruct(
        args.dirs,
        outputs,
        sigma_rel=sigmas,
        t=args.t,
        dtype=args.dtype,
        accumulate_dtype=args.accumulate_dtype,
        threads=args.threads,
        progress=progress,
    )
    for k, (s, out) in enumerate(zip(sigmas, outputs, strict=True)):
        print(
            f"wrote {out}: sigma_rel={s:g} (gamma={sigma_rel_to_gamma(s):.4f}) at t={t_end:g}, "
            f"sum |coefficients| = {float(np.abs(coef[:, k]).sum()):.3f}"
        )
    return 0


# -- registry ---------------------------------------------------------------------------------
Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]

COMMANDS: list[Command] = [
    ("merge", "average checkpoints on disk into one, in bounded memory", _add_merge, cmd_merge),
    (
        "inspect",
        "list a checkpoint's tensors, dtypes, shapes, sizes and metadata",
        _add_inspect,
        cmd_inspect,
    ),  # fmt: skip
    (
        "weights",
        "print a schedule's weights as a table with a bar chart",
        _add_weights,
        cmd_weights,
    ),  # fmt: skip
    (
        "demo",
        "generate small checkpoints, merge them with this CLI and check the result",
        _add_demo,
        cmd_demo,
    ),  # fmt: skip
    (
        "posthoc",
        "reconstruct power EMAs of any sigma_rel from post-hoc EMA snapshots (EDM2)",
        _add_posthoc,
        cmd_posthoc,
    ),  # fmt: skip
]


def build_parser() -> argparse.ArgumentParser:
    from polyak import __version__

    parser = argparse.ArgumentParser(
        prog="polyak",
        description="Average model weights: merge checkpoints on disk in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"polyak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polyak`` command line (``polyak`` and ``python -m polyak`` call this).

    Bad input and refused writes print one line, ``polyak: error: ...``, on stderr, never a
    traceback; usage mistakes print argparse's usage line and that message.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for an error (bad input, a failed write, a check
        that failed), 130 when interrupted.

    Raises:
        SystemExit: status 2 for a usage error, or 0 after ``--help``/``--version``
            (argparse's convention).

    Example:
        >>> main(["weights", "linear", "-n", "3"])
        linear(), n=3 (oldest first):
             0      0.166667  #############
             1      0.333333  ###########################
             2      0.500000  ########################################
           sum      1.000000
        0
    """
    from polyak._errors import PolyakError
    from polyak.safetensors._errors import OutputWriteError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return code
    except CliError as e:
        parser.error(str(e))  # exits with status 2
    except (PolyakError, OutputWriteError) as e:
        print(f"polyak: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`polyak inspect ... | head`): stop quietly, and
        # point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # The system refused something (permissions, a path through a file): a one-line
        # message naming the path, not a traceback.
        print(f"polyak: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("polyak: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
