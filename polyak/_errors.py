"""The exceptions polyak raises for bad input, and the warning it gives about input order.

Every error subclasses :class:`PolyakError`, itself a :class:`ValueError`, so callers can
catch all of polyak's input errors at once, or one kind precisely.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

__all__ = [
    "PolyakError",
    "EmptyInputError",
    "StructureError",
    "ShapeError",
    "DtypeError",
    "WeightsError",
    "ScheduleError",
    "NoOnlineFormError",
    "OrderWarning",
]
# show_value, check_int and warn_at_caller (below) are helpers, not errors: kept out of
# __all__, which polyak re-exports.

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` if it is a Python int (not a bool) of at least ``low``.

    Raises:
        PolyakError: naming the argument and its value, e.g. ``every must be an int >= 1,
            got every=0``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PolyakError(f"{name} must be an int >= {low}, got {name}={value!r}")
    return value


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` at the first frame outside polyak: the user's line, however many
    polyak functions (decorators, front doors) lie between it and the warning.

    A fixed ``stacklevel`` points into polyak as soon as one more function wraps the call
    (``skip_file_prefixes`` does this walk, but only from Python 3.12).
    """
    frame = sys._getframe(1)
    level = 2  # warnings.warn(stacklevel=2) names the frame that called this function
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def show_value(value: object) -> str:
    """``repr(value)`` for a message, but short for a huge int (10**400 has 401 digits, and
    the repr of one over 4300 digits raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        bits = value.bit_length()
        return f"an integer of {bits} bits (about 10**{int(bits * 0.30103)})"
    return repr(value)


class PolyakError(ValueError):
    """Base class of every error polyak raises for bad input."""


class EmptyInputError(PolyakError):
    """Nothing to average: an empty list of snapshots or checkpoints."""


class StructureError(PolyakError):
    """Two pytrees (or checkpoints) do not have the same structure or tensor names."""


class ShapeError(PolyakError):
    """A leaf's shape differs between snapshots."""


class DtypeError(PolyakError):
    """A leaf's dtype cannot be averaged, or its kind differs between snapshots."""


class WeightsError(PolyakError):
    """Weights that cannot be used: NaN/inf, a zero or negative sum, or the wrong count."""


class ScheduleError(PolyakError):
    """A schedule was given bad parameters, or cannot be resolved from what was given."""


class NoOnlineFormError(ScheduleError):
    """The schedule has no online form ``decay(t)`` (it depends on the final count n)."""


class OrderWarning(UserWarning):
    """Numbered inputs are not in natural order (``epoch_10`` given before ``epoch_9``).

    polyak keeps the order given, oldest first; pass ``sort="natural"`` (CLI:
    ``--sort natural``) to order numbered names by their numbers instead.
    """
