"""A model's weights by name: the names snapshots are saved under, and putting a named average
(``WeightAveraging(snapshot_dir=...)``'s ``snapshots.average(...)``) back into the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from polyak._errors import PolyakError, ShapeError, StructureError

__all__ = ["weight_names", "set_weights"]


def weight_names(model: Any) -> list[str]:
    """Snapshot tensor names in ``get_weights()`` order: variable paths without the model name
    (``dense/kernel``); an index prefix keeps apart two variables that share a path."""
    prefix = model.name + "/"
    names = [v.path[len(prefix) :] if v.path.startswith(prefix) else v.path for v in model.weights]
    if len(set(names)) < len(names):
        names = [f"{i:04d}:{name}" for i, name in enumerate(names)]
    return names


def set_weights(model: Any, weights: Mapping[str, Any]) -> None:
    """Put weights given by name into ``model``: an average of the snapshots that
    :class:`WeightAveraging` saved with ``snapshot_dir`` (a dict in alphabetical order, which
    ``model.set_weights`` would misplace).

    Names are the variables' paths without the model's name (``dense/kernel``), as
    :class:`WeightAveraging` saves them; every variable of ``model`` must be given, with its
    shape. Nothing is written when a name or shape does not match.

    Args:
        model: A built Keras model, of the architecture the snapshots were taken from (with
            the same layer names).
        weights: Tensor name -> array, e.g. ``callback.snapshots.average("linear")``.

    Raises:
        StructureError: names missing from ``weights`` or not in the model (listed).
        ShapeError: an array's shape differs from its variable's (named).
        PolyakError: ``weights`` is not a mapping (a list goes to ``model.set_weights``).

    Example:
        >>> cb = polyak.keras.WeightAveraging("equal", snapshot_dir="snaps")  # doctest: +SKIP
        >>> model.fit(x, y, epochs=10, callbacks=[cb])  # doctest: +SKIP
        >>> polyak.keras.set_weights(model, cb.snapshots.average("linear"))  # doctest: +SKIP
    """
    if not isinstance(weights, Mapping):
        raise PolyakError(
            f"weights must map tensor names to arrays, got {type(weights).__name__}; "
            "a list in get_weights() order goes to model.set_weights(...)"
        )
    names = weight_names(model)
    missing = [n for n in names if n not in weights]
    unexpected = sorted(set(weights) - set(names))
    if missing or unexpected:
        raise StructureError(
            f"weights do not match the variables of model {model.name!r}: missing "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, not in the model "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (names are variable "
            "paths without the model name, as WeightAveraging saves them)"
        )
    arrays = [np.asarray(weights[n]) for n in names]
    for name, array, variable in zip(names, arrays, model.weights):
        if tuple(array.shape) != tuple(variable.shape):
            raise ShapeError(
                f"weights[{name!r}] has shape {tuple(array.shape)}, the model's variable "
                f"{tuple(variable.shape)}"
            )
    model.set_weights(arrays)
