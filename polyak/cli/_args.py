"""Argument helpers shared by the ``polyak`` subcommands: schedules, output, progress, tables.

The schedule flags (``--decay``, ``--last``, ...) and the flags shaping what is written
(``--dtype``, ``--threads``, ...) each come from one table, so that every subcommand taking
them accepts the same flags with the same help.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CliError",
    "add_schedule_arguments",
    "schedule_from_args",
    "add_output_arguments",
    "output_settings",
    "add_progress_arguments",
    "wants_progress",
    "parse_numbers",
    "weights_table",
    "join_number_lists",
]

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

# flag -> add_argument keywords; the dest of each is a key of polyak.safetensors.MergeSettings.
_OUTPUT_FLAGS: dict[str, dict[str, Any]] = {
    "--dtype": dict(
        default=None,
        help="cast float tensors of the output: bf16, fp16, fp32, fp64, fp8_e4m3 or fp8_e5m2 "
        "(default: keep each tensor's dtype); fp8_e4m3 saturates to +-448, as torch does",
    ),
    "--int-policy": dict(
        default="last", choices=["last", "first", "average", "error"],
        help="integer/bool tensors: take the last (default), first, average, or fail",
    ),
    "--accumulate-dtype": dict(
        default=None, metavar="DTYPE",
        help="accumulate in this dtype, e.g. float64 (default: float32, float64 for float64)",
    ),
    "--threads": dict(
        type=int, default=None, metavar="N",
        help="worker threads (default: the usable cores, at most 8)",
    ),
    "--max-shard-size": dict(
        default=None, metavar="SIZE",
        help="for a directory output: largest shard, e.g. 5GB (10**9 bytes) or 2GiB "
        "(default: the first input's shard layout)",
    ),
}  # fmt: skip


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
        if key in _IMPLIED:  # say what the flag does on its own, as schedule_from_args does it
            text += f" (without --schedule, implies --schedule {_IMPLIED[key]})"
        group.add_argument(flag, dest=f"sp_{key}", type=typ, metavar=metavar, help=text)
    group.add_argument(
        "--weights", default=None, metavar="W1,W2,...",
        help="explicit weights, one per checkpoint, oldest first (instead of a schedule)",
    )  # fmt: skip
    group.add_argument(
        "--no-normalize", dest="normalize", action="store_false",
        help="use the weights as given instead of dividing them by their sum",
    )  # fmt: skip


# Options whose value is a list of numbers that may start with "-": argparse would take
# "--weights -1,2" for an unknown option "-1,2".
NUMBER_LIST_OPTIONS = ("--weights", "--sigma-rel")
_NUMBER_LIST = re.compile(r"-[0-9.]+([eE][-+]?[0-9]+)?(,.*)?")


def join_number_lists(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--weights -1,2`` rewritten as ``--weights=-1,2``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in NUMBER_LIST_OPTIONS and i + 1 < len(argv):
            if _NUMBER_LIST.fullmatch(argv[i + 1]):
                out.append(f"{argv[i]}={argv[i + 1]}")
                i += 2
                continue
        out.append(argv[i])
        i += 1
    return out


def parse_numbers(text: str) -> list[float]:
    """Comma-separated numbers (``--weights``, ``--sigma-rel``); CliError names the text."""
    items = text.replace(" ", "").split(",")
    if items and items[-1] == "":
        items.pop()  # a trailing comma, as in "1,2,"
    if not items or "" in items:
        raise CliError(f"weights must be comma-separated numbers, got {text!r} (an empty entry)")
    try:
        return [float(t) for t in items]
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
        return schedules.explicit(parse_numbers(weights_text))
    if name is None:
        implied = {_IMPLIED[k] for k in params if k in _IMPLIED}
        if len(implied) > 1:
            raise CliError(
                f"parameters {sorted(params)} belong to different schedules; pass --schedule"
            )
        name = implied.pop() if implied else "equal"
        if name != "equal":  # the inference is said, never silent (issue 14)
            given = ", ".join(f for f, (k, _, _) in _SCHEDULE_PARAMS.items() if k in params)
            print(f"polyak: {given} without --schedule: using --schedule {name}", file=sys.stderr)
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


def weights_table(w: Sequence[float], labels: Sequence[str] | None = None, width: int = 40) -> str:
    """Weights as rows of index, label, value and a text bar scaled to the largest, then
    their sum: the table ``polyak weights``, ``merge --dry-run`` and the demo print."""
    top = max((abs(x) for x in w), default=0.0) or 1.0
    rows = []
    lab = list(labels) if labels is not None else [""] * len(w)
    lab_width = max((len(s) for s in lab), default=0)
    for i, (x, name) in enumerate(zip(w, lab, strict=True)):
        bar = ("#" if x >= 0 else "-") * round(abs(x) / top * width)
        rows.append(f"  {i:>4}  {name:<{lab_width}}  {x:>10.6f}  {bar}".rstrip())
    rows.append(f"  {'sum':>4}  {'':<{lab_width}}  {float(np.sum(w)):>10.6f}")
    return "\n".join(rows)


def add_output_arguments(p: argparse.ArgumentParser, flags: Sequence[str]) -> None:
    """The given flags of the table above (``"--dtype"``, ``"--threads"``...), as a group."""
    group = p.add_argument_group("output")
    for flag in flags:
        group.add_argument(flag, **_OUTPUT_FLAGS[flag])


def output_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The merge settings given by the flags of :func:`add_output_arguments`."""
    dests = (flag[2:].replace("-", "_") for flag in _OUTPUT_FLAGS)
    return {d: getattr(args, d) for d in dests if hasattr(args, d)}


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


def wants_progress(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress`` as given, else whether stderr is a terminal."""
    return bool(args.progress) if args.progress is not None else sys.stderr.isatty()
