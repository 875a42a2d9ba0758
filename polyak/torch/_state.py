"""The averager's settings, checked once, and its saved state, checked on load.

A saved state holds only tensors, Python numbers, strings, lists and dicts, which is what
``torch.load(..., weights_only=True)`` accepts and what ``torch.distributed.checkpoint``
stores as-is.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from polyak import schedules as _schedules
from polyak._errors import (
    DtypeError,
    PolyakError,
    ScheduleError,
    ShapeError,
    StructureError,
    check_int,
)
from polyak._kernel import check_int_policy
from polyak._tree import check_names
from polyak.torch._sharded import is_dtensor

__all__ = [
    "options",
    "plain_options",
    "schedule_spec",
    "check_settings",
    "check_average",
    "BUFFERS",
]

BUFFERS = ("average", "copy")
_KEYS = ("average", "calls", "count", "options", "schedule")


def options(buffers: str, every: int, int_policy: str, dtype: torch.dtype | None) -> dict:
    """Check the averager's options; return them as a dict.

    Raises:
        PolyakError: an option is not one of its allowed values.
    """
    if buffers not in BUFFERS:
        raise PolyakError(f"buffers must be one of {BUFFERS}, got buffers={buffers!r}")
    check_int("every", every, 1)
    check_int_policy(int_policy)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DtypeError(f"dtype must be a floating torch.dtype or None, got dtype={dtype!r}")
    return {"buffers": buffers, "every": every, "int_policy": int_policy, "dtype": dtype}


def plain_options(opts: dict) -> dict:
    """The options as plain Python values (the dtype by name)."""
    return {**opts, "dtype": None if opts["dtype"] is None else str(opts["dtype"])}


def schedule_spec(schedule: _schedules.Schedule) -> dict:
    """``{"name": ..., "params": {...}}`` with plain Python values only."""
    return {"name": schedule.name, "params": {k: _plain(v) for k, v in schedule.params.items()}}


def _plain(v: Any) -> Any:
    # numpy scalars in a Schedule's params would make the state unloadable with
    # weights_only=True: keep Python numbers only.
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return repr(v)


def check_settings(state: Any, schedule: _schedules.Schedule, opts: dict) -> None:
    """Check a saved state's keys, schedule and options against the averager's.

    Raises:
        StructureError: keys missing or unexpected.
        ScheduleError: saved with another schedule.
        PolyakError: saved with other options (resuming would not continue the same run).
    """
    if not isinstance(state, dict):
        raise StructureError(f"expected a dict from ModelAverager.state_dict(), got {state!r}")
    check_names(_KEYS, state, "not a ModelAverager state (its keys)")
    saved = state["schedule"]
    try:
        saved_schedule = _schedules.from_spec(saved["name"], saved["params"])
    except (KeyError, TypeError) as err:
        raise ScheduleError(f"saved schedule {saved!r} is not a schedule spec: {err}") from None
    if saved_schedule != schedule:
        raise ScheduleError(
            f"the state was saved with schedule {saved_schedule!r}, this averager folds "
            f"{schedule!r}: make the averager with the saved schedule to resume"
        )
    mine = plain_options(opts)
    differ = sorted(k for k in mine if state["options"].get(k) != mine[k])
    if differ:
        pairs = ", ".join(f"{k}={state['options'].get(k)!r} (here {mine[k]!r})" for k in differ)
        raise PolyakError(f"the state was saved with other options: {pairs}")


def check_average(average: Any, acc: dict[str, torch.Tensor]) -> None:
    """Check saved accumulators against the averager's: names, shapes, dtypes, sharding.

    Raises:
        StructureError: names missing or unexpected, all listed.
        ShapeError, DtypeError: naming every accumulator that does not fit.
    """
    if not isinstance(average, dict):
        raise StructureError(f"state['average'] must be a dict of tensors, got {average!r}")
    check_names(acc, average, "saved average does not fit this model")
    shapes, kinds = [], []
    for name, a in acc.items():
        s = average[name]
        if not isinstance(s, torch.Tensor):
            kinds.append(f"{name}: {type(s).__name__}, expected a tensor")
        elif tuple(s.shape) != tuple(a.shape):
            shapes.append(f"{name}: shape {tuple(s.shape)}, expected {tuple(a.shape)}")
        elif s.dtype != a.dtype or is_dtensor(s) != is_dtensor(a):
            kinds.append(f"{name}: {_kind(s)}, expected {_kind(a)}")
    if shapes:
        raise ShapeError("saved average differs in shape: " + "; ".join(shapes))
    if kinds:
        raise DtypeError("saved average differs in dtype: " + "; ".join(kinds))


def _kind(t: torch.Tensor) -> str:
    return f"{'DTensor' if is_dtensor(t) else 'tensor'} {t.dtype}"
