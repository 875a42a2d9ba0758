"""Small helpers shared by the merge, the command line and user scripts.

Example:
    >>> from polyak.utils import format_bytes, natural_key, order_inputs
    >>> format_bytes(3 * 2**20)
    '3.0 MiB'
    >>> sorted(["epoch_10", "epoch_9"], key=natural_key)
    ['epoch_9', 'epoch_10']
    >>> order_inputs(["epoch_10.keras", "epoch_9.keras"], sort="natural")
    ['epoch_9.keras', 'epoch_10.keras']
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Literal, TypeVar

from polyak._errors import OrderWarning, PolyakError, warn_at_caller

__all__ = ["format_bytes", "natural_key", "order_problem", "order_inputs"]

P = TypeVar("P", bound="str | os.PathLike[str]")


def format_bytes(n: float) -> str:
    """A byte count in binary units: ``"512 B"``, ``"1.5 KiB"``, ... up to TiB.

    Args:
        n: a number of bytes (may be a float, e.g. an average per thread).

    Returns:
        Whole bytes below 1 KiB, else one decimal and the largest unit that keeps the number
        under 1024 (TiB at most).

    Raises:
        TypeError: ``n`` is not a number.

    Example:
        >>> format_bytes(1000), format_bytes(1536), format_bytes(5 * 2**40)
        ('1000 B', '1.5 KiB', '5.0 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns at TiB


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """A sort key that orders the numbers inside names by value: ``epoch_9`` before ``epoch_10``.

    Args:
        name: a file name (or any string).

    Returns:
        A list comparing runs of digits as integers and other text as text.

    Raises:
        TypeError: ``name`` is not a string.

    Example:
        >>> sorted(["step_1000", "step_200", "step_30"], key=natural_key)
        ['step_30', 'step_200', 'step_1000']
    """
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _basename(path: str | os.PathLike[str]) -> str:
    return os.path.basename(os.path.normpath(os.fspath(path)))


def order_problem(paths: Sequence[str | os.PathLike[str]]) -> str | None:
    """What is wrong with the order of numbered paths, or None when nothing is.

    Paths whose file names all hold a number are expected in natural order (``epoch_9``
    before ``epoch_10``); ``sorted(glob(...))`` gives ``epoch_10`` first.

    Args:
        paths: checkpoint or model file paths, in the order they will be averaged.

    Returns:
        The warning text naming the first pair out of order, or None (fewer than two paths,
        a name without a number, or the natural order).

    Raises:
        TypeError: a path is not a string or path-like object.

    Example:
        >>> order_problem(["step_9.safetensors", "step_10.safetensors"]) is None
        True
        >>> order_problem(["step_10", "step_9"]).split(";")[0]
        "inputs are not in natural order: 'step_10' is given before 'step_9'"
    """
    names = [_basename(p) for p in paths]
    if len(names) < 2 or not all(re.search(r"\d", n) for n in names):
        return None
    for a, b in zip(names, names[1:]):
        if natural_key(a) > natural_key(b):
            return (
                f"inputs are not in natural order: {a!r} is given before {b!r}; polyak keeps "
                "the order given (oldest first), which sets each input's weight (except with "
                "'equal') and, with every schedule, which input the integer tensors (step "
                "counters, BatchNorm's num_batches_tracked) come from: the last one given "
                "(int_policy='last'). Pass sort='natural' (command line: --sort natural) to "
                "order numbered names by their numbers"
            )
    return None


def order_inputs(paths: Sequence[P], sort: Literal["natural"] | None = None) -> list[P]:
    """The paths in the order to average them: as given (with a warning when numbered names
    are out of natural order), or sorted naturally with ``sort="natural"``.

    Every polyak function that takes a list of checkpoint or model paths calls this first.

    Args:
        paths: checkpoint or model file paths, oldest first.
        sort: ``None`` keeps the order given; ``"natural"`` orders the file names with
            :func:`natural_key` (``epoch_9`` before ``epoch_10``).

    Returns:
        A new list of the same paths.

    Raises:
        PolyakError: ``sort`` is neither ``None`` nor ``"natural"``, or ``paths`` is a single
            path.

    Warns:
        OrderWarning: ``sort`` is None and :func:`order_problem` finds a problem; it points
            at the first line outside polyak, the user's call.

    Example:
        >>> order_inputs(["b/step_2", "a/step_10"], sort="natural")
        ['b/step_2', 'a/step_10']
        >>> order_inputs(["step_1", "step_2"])
        ['step_1', 'step_2']
    """
    if sort not in (None, "natural"):
        raise PolyakError(
            f"sort={sort!r} is not an order polyak knows; use sort='natural' (numbered names "
            "by their numbers) or sort=None (the order given)"
        )
    if isinstance(paths, (str, os.PathLike)):
        raise PolyakError(
            f"inputs must be a sequence of checkpoint paths (oldest first), got a single path "
            f"{os.fspath(paths)!r}"
        )
    items = list(paths)
    if sort == "natural":
        return sorted(items, key=lambda p: natural_key(_basename(p)))
    problem = order_problem(items)
    if problem:
        warn_at_caller(problem, OrderWarning)
    return items
