"""Saving and resuming an online average: as a dict, or as a safetensors file.

The file holds the accumulators as tensors (named as :func:`polyak.safetensors.save` names
them: nested keys joined by ``"."``) and, as JSON in its ``__metadata__``, the count, the
schedule, the int policy and the snapshots' dtypes. :func:`load` adopts the array library,
device and structure of ``like`` when given, so a torch run on a GPU resumes on the GPU;
without it, the state is numpy, a flat dict by tensor name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import optree

from polyak import _backend
from polyak import _online_leaves as _leaves
from polyak import schedules as _schedules
from polyak._errors import EmptyInputError, PolyakError
from polyak._kernel import check_int_policy
from polyak._tree import check_names, flatten, where
from polyak._types import PathLike
from polyak.online import OnlineState, init

__all__ = ["Loaded", "save", "load", "to_dict", "from_dict", "schedule_spec"]

STATE_KEYS = ("count", "average", "dtypes", "schedule", "int_policy")
_META_FORMAT = "polyak.format"
_FORMAT = "polyak.Averager/1"
_LIKE = "like"


class Loaded(NamedTuple):
    """A state read back with the options it was made with."""

    state: OnlineState
    schedule: _schedules.Schedule
    int_policy: str


def schedule_spec(schedule: _schedules.Schedule) -> dict[str, Any]:
    """``{"name": ..., "params": {...}}`` as it reads back from JSON (tuples become lists,
    numpy floats Python floats), so a saved schedule compares equal to the one it came from."""
    return {"name": schedule.name, "params": _jsonable(schedule.params)}


def _jsonable(params: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(params), default=float, sort_keys=True))


def to_dict(state: OnlineState, schedule: _schedules.Schedule, int_policy: str) -> dict[str, Any]:
    """The state as a dict of copies that later in-place updates leave alone."""
    average = None
    if state.average is not None:
        accs, _, spec = flatten(state.average)
        average = spec.unflatten([_leaves.copy(acc) for acc in accs])
    return {
        "count": state.count,
        "average": average,
        "dtypes": [_backend.dtype_name(d) for d in state.dtypes],
        "schedule": {"name": schedule.name, "params": dict(schedule.params)},
        "int_policy": int_policy,
    }


def from_dict(
    state_dict: Mapping[str, Any], schedule: _schedules.Schedule, int_policy: str
) -> OnlineState:
    """The state of a :func:`to_dict` dict made with this schedule and int policy.

    Raises:
        PolyakError: a key is missing or malformed, or the schedule or int policy differ.
    """
    if not isinstance(state_dict, Mapping):
        raise PolyakError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    missing = sorted(set(STATE_KEYS) - set(state_dict))
    if missing:
        raise PolyakError(f"state_dict is missing the keys {missing}")
    _check_config(state_dict["schedule"], state_dict["int_policy"], schedule, int_policy)
    count = _check_count(state_dict["count"], "state_dict['count']")
    average = state_dict["average"]
    if (count == 0) != (average is None):
        raise PolyakError(
            f"state_dict['count'] is {count} but state_dict['average'] is "
            f"{'None' if average is None else 'set'}: an empty state has count 0 and no "
            "average"
        )
    if average is None:
        return init()
    accs, _, spec = flatten(average)
    names = state_dict["dtypes"]
    if not isinstance(names, (list, tuple)) or len(names) != len(accs):
        raise PolyakError(
            f"state_dict['dtypes'] must list one dtype per leaf of state_dict['average'] "
            f"({len(accs)}), got {names!r:.200}"
        )
    accs = [_leaves.copy(_leaves.as_array(acc)) for acc in accs]
    dtypes = tuple(_backend.get(acc).dtype_from_name(n) for n, acc in zip(names, accs))
    return OnlineState(count, spec.unflatten(accs), dtypes)


def save(
    path: PathLike, state: OnlineState, schedule: _schedules.Schedule, int_policy: str
) -> None:
    """Write ``state`` to a safetensors file, atomically.

    Raises:
        EmptyInputError: nothing has been averaged yet.
        DtypeError: an accumulator has no safetensors dtype (complex leaves).
        OutputWriteError: the file system refused the write; nothing is left behind.
    """
    from polyak import safetensors as st

    if state.count == 0:
        raise EmptyInputError("nothing to save: call update(params) first")
    names = tensor_names(state.average)
    metadata = {
        _META_FORMAT: _FORMAT,
        "polyak.count": str(state.count),
        "polyak.schedule": json.dumps(schedule_spec(schedule)),
        "polyak.int_policy": int_policy,
        "polyak.dtypes": json.dumps(dict(zip(names, map(_backend.dtype_name, state.dtypes)))),
    }
    st.save(state.average, path, metadata)


def load(path: PathLike, like: Any = None) -> Loaded:
    """Read a state written by :func:`save`, in the library, device and structure of
    ``like`` (matched by tensor name), or as numpy arrays in a flat dict by tensor name.

    Raises:
        PolyakError: the file was not written by :func:`save` or its metadata is malformed
            (naming the file and the key).
        StructureError, ShapeError, DtypeError: ``like`` does not match the saved average.
        CheckpointError: the path is not a safetensors file.
    """
    from polyak import safetensors as st

    shown = os.fspath(path)
    meta = st.read_metadata(path) or {}
    if meta.get(_META_FORMAT) != _FORMAT:
        raise PolyakError(
            f"{shown}: not an Averager state (no {_META_FORMAT}={_FORMAT!r} in its "
            "metadata); write one with Averager.save(path)"
        )
    try:
        spec = json.loads(meta["polyak.schedule"])
        dtypes = json.loads(meta["polyak.dtypes"])
        count = int(meta["polyak.count"])
        int_policy = check_int_policy(meta["polyak.int_policy"])
        schedule = _schedules.from_spec(spec["name"], spec["params"])
    except (KeyError, TypeError, ValueError) as err:
        raise PolyakError(f"{shown}: malformed Averager metadata: {err!r}") from None
    if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
        raise PolyakError(
            f"{shown}: malformed Averager metadata: polyak.dtypes must map tensor names to "
            f"dtype names, got {dtypes!r:.200}"
        )
    tensors = st.load(path)
    if set(tensors) != set(dtypes) or count < 1:
        raise PolyakError(
            f"{shown}: the metadata names {sorted(dtypes)} with count {count}, but the "
            f"file holds the tensors {sorted(tensors)}"
        )
    if like is None:  # numpy, a flat dict by tensor name
        average = {name: np.array(a, order="C", copy=True) for name, a in tensors.items()}
        names = tensor_names(average)  # flattening order
        kept = tuple(_backend.get(average[n]).dtype_from_name(dtypes[n]) for n in names)
        return Loaded(OnlineState(count, average, kept), schedule, int_policy)
    return Loaded(_adopt(count, tensors, dtypes, like), schedule, int_policy)


def _adopt(
    count: int, tensors: dict[str, np.ndarray], dtypes: dict[str, str], like: Any
) -> OnlineState:
    """The saved accumulators in the structure, library and device of ``like``."""
    leaves, accessors, spec = flatten(like)
    names = tensor_names(like)
    check_names(
        tensors, names, f"{_LIKE} does not match the saved average",
        " (names as polyak.safetensors.save gives them)",
    )  # fmt: skip
    accs, kept = [], []
    for name, leaf, accessor in zip(names, leaves, accessors):
        x = _leaves.as_array(leaf)
        be = _backend.get(x)
        acc = be.from_numpy(tensors[name], x)
        dtype = be.dtype_from_name(dtypes[name])
        _leaves.check(acc, x, dtype, partial(where, accessor, root=_LIKE))
        accs.append(acc)
        kept.append(dtype)
    return OnlineState(count, spec.unflatten(accs), tuple(kept))


def tensor_names(tree: Any) -> list[str]:
    """The safetensors names :func:`polyak.safetensors.save` gives the leaves of ``tree``."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [".".join(str(p) for p in path) for path in paths]


def _check_config(saved_schedule: Any, saved_policy: Any, schedule: Any, int_policy: str) -> None:
    mine = schedule_spec(schedule)
    try:
        theirs = {"name": saved_schedule["name"], "params": _jsonable(saved_schedule["params"])}
    except (KeyError, TypeError, ValueError):
        raise PolyakError(
            f"state_dict['schedule'] must be {{'name': ..., 'params': {{...}}}}, got "
            f"{saved_schedule!r:.200}"
        ) from None
    if mine != theirs:
        raise PolyakError(
            f"state_dict holds an average with schedule {theirs}, but this Averager uses "
            f"{mine}: resuming with another schedule would not continue the same average "
            "(make the Averager with the saved schedule)"
        )
    if saved_policy != int_policy:
        raise PolyakError(
            f"state_dict holds an average with int_policy={saved_policy!r}, but this Averager "
            f"uses int_policy={int_policy!r}"
        )


def _check_count(count: Any, name: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise PolyakError(f"{name} must be a non-negative int, got {count!r}")
    return int(count)
