"""The ``"polyak"`` merge record each output carries in its ``__metadata__``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from polyak._errors import PolyakError
from polyak._types import IntPolicy
from polyak.schedules import Schedule

__all__ = ["describe", "output_metadata"]


def describe(schedule: Schedule | None) -> dict[str, Any]:
    """The schedule as the record stores it: its name and parameters ("explicit" for None)."""
    if schedule is None:
        return {"name": "explicit"}
    return {"name": schedule.name, "params": dict(schedule.params)}


def output_metadata(
    base: Mapping[str, str] | None,
    first_input: Mapping[str, str] | None,
    *,
    weights: np.ndarray,
    schedule: Schedule | None,
    int_policy: IntPolicy,
    inputs: Sequence[str],
    dtype: np.dtype | None,
) -> dict[str, str]:
    """An output's ``__metadata__``: ``base`` (default: the first input's) plus the record.

    Raises:
        PolyakError: ``base`` is not a map of strings to strings.
    """
    if base is None:
        meta = dict(first_input or {})
    elif isinstance(base, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in base.items()
    ):
        meta = dict(base)
    else:
        raise PolyakError(f"metadata entries must map strings to strings, got {base!r:.200}")
    record: dict[str, Any] = {
        "schedule": describe(schedule),
        "weights": [float(x) for x in weights],
        "int_policy": int_policy,
        "inputs": [os.path.basename(os.path.normpath(p)) for p in inputs],
    }
    if dtype is not None:
        record["dtype"] = str(dtype)
    meta["polyak"] = json.dumps(record, default=repr)
    return meta
