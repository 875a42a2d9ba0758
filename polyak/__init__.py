"""polyak: average model weights, for any framework, in bounded memory.

Polyak-Ruppert averaging, EMA, SWA, checkpoint averaging and model soups over parameter
pytrees (:func:`average`, :class:`Averager` and its pure core :mod:`polyak.online`) and
safetensors checkpoints on disk (:mod:`polyak.safetensors`), with pluggable weight
:mod:`~polyak.schedules`.

Example:
    >>> import numpy as np, polyak
    >>> snaps = [{"w": np.full(3, float(i))} for i in range(4)]  # oldest first
    >>> polyak.average(snaps, "linear")["w"]
    array([2., 2., 2.])
"""

import importlib
from typing import TYPE_CHECKING

from polyak import _errors, online, posthoc, schedules, soup
from polyak._average import average, weights
from polyak._errors import *  # noqa: F403  (PolyakError and its subclasses: _errors.__all__)
from polyak._online import Averager
from polyak._types import IntPolicy, PathLike, ScheduleLike
from polyak.schedules import Schedule

if TYPE_CHECKING:  # what __getattr__ loads lazily, as type checkers and editors must see it
    from polyak import checkpoints as checkpoints
    from polyak import safetensors as safetensors
    from polyak import utils as utils
    from polyak._merge import merge as merge
    from polyak._snapshots import SnapshotDir as SnapshotDir

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "average",
    "weights",
    "Averager",
    "online",
    "SnapshotDir",  # loaded lazily by __getattr__ below
    "merge",  # loaded lazily by __getattr__ below
    "schedules",
    "Schedule",
    "ScheduleLike",
    "IntPolicy",
    "PathLike",
    "posthoc",
    "soup",
    *_errors.__all__,  # PolyakError and its subclasses
]


# Adapters load on first use (``polyak.safetensors.merge``, ``polyak.keras``), so that
# ``import polyak`` imports no framework and no file-format code.
_LAZY_MODULES = ("safetensors", "checkpoints", "keras", "cli", "utils")


def __getattr__(name: str):
    if name == "SnapshotDir":
        from polyak._snapshots import SnapshotDir

        return SnapshotDir
    if name == "merge":  # the format-neutral merge: loads the checkpoint readers on first use
        from polyak._merge import merge

        return merge
    if name in _LAZY_MODULES:
        return importlib.import_module(f"polyak.{name}")
    raise AttributeError(f"module 'polyak' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"SnapshotDir", "merge", *_LAZY_MODULES})
