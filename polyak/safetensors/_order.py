"""The natural-order check: numbered checkpoints given as ``epoch_10`` before ``epoch_9``."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from polyak._types import PathLike
from polyak.utils import natural_key

__all__ = ["OrderWarning", "natural_order_problem"]


class OrderWarning(UserWarning):
    """Inputs with numbered names are not in natural order (``epoch_10`` before ``epoch_9``)."""


def natural_order_problem(paths: Sequence[PathLike]) -> str | None:
    """A warning text when numbered file names are not in natural order, else None."""
    names = [os.path.basename(os.path.normpath(os.fspath(p))) for p in paths]
    if len(names) < 2 or not all(re.search(r"\d", n) for n in names):
        return None
    for a, b in zip(names, names[1:]):
        if natural_key(a) > natural_key(b):
            return (
                f"inputs are not in natural order: {a!r} is given before {b!r}; polyak keeps "
                "the order given (oldest first), which matters for every schedule but 'equal'"
            )
    return None
