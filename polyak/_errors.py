"""The exceptions polyak raises for bad input, and the warning it gives about input order.

Every error subclasses :class:`PolyakError`, itself a :class:`ValueError`, so callers can
catch all of polyak's input errors at once, or one kind precisely.
"""

from __future__ import annotations

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
