"""A Keras model's architecture as plain data, and the checks that two of them match.

Models are matched layer by layer, in order, the way ``set_weights`` matches them. Layer names
may differ by Keras' automatic numbering (``dense`` and ``dense_3`` are both "dense"), so that
two models built by the same function average without renaming; layer types, base names,
variable names and shapes must agree, and a mismatch names the layer and the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import keras

from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError, StructureError

__all__ = ["Layout", "layout", "check_layout", "check_all", "nonempty", "empty_copy"]


class Layer(NamedTuple):
    name: str
    kind: str
    variables: tuple[tuple[str, tuple[int, ...], str, str], ...]  # name, shape, dtype, path


class Layout(NamedTuple):
    """A model's architecture as plain data, so it outlives the model it describes."""

    layers: tuple[Layer, ...]
    count: int  # number of variables get_weights() returns


def _base_name(name: str) -> str:
    # Keras numbers repeated default names: "dense", "dense_1", "dense_2" are one name.
    return re.sub(r"_\d+$", "", name)


def _variable(v: Any) -> tuple[str, tuple[int, ...], str, str]:
    # The path ("block/dense_2/kernel") is only shown: it holds auto-numbered layer names.
    return (v.name, tuple(int(d) for d in v.shape), str(v.dtype), v.path)


def layout(model: Any, label: str) -> Layout:
    """The architecture of ``model`` (named ``label`` in errors), which must be built."""
    if not isinstance(model, keras.Model):
        raise PolyakError(f"{label} is a {type(model).__name__}, not a keras.Model")
    if not model.weights:
        raise PolyakError(
            f"{label} ({model.name!r}) has no weights: build it first (call it on a batch, "
            "or model.build(input_shape))"
        )
    layers = tuple(
        Layer(layer.name, type(layer).__name__, tuple(_variable(v) for v in layer.weights))
        for layer in model.layers
    )
    # len(model.weights) also counts variables a subclassed model holds outside its layers.
    return Layout(layers, len(model.weights))


def _describe(layer: Layer, position: int) -> str:
    return f"layer {position} {layer.name!r} ({layer.kind})"


def _check_variables(mine: Layer, theirs: Layer, here: str, there: str) -> None:
    names = [v[0] for v in mine.variables]
    ref_names = [v[0] for v in theirs.variables]
    if names != ref_names:
        missing = sorted(set(ref_names) - set(names))
        unexpected = sorted(set(names) - set(ref_names))
        detail = (
            f"missing {missing}, unexpected {unexpected}"
            if missing or unexpected
            else (f"variables in order {names}, expected {ref_names}")
        )
        raise StructureError(f"{here} has other variables than {there}: {detail}")
    for (_, shape, dtype, path), (_, ref_shape, ref_dtype, _) in zip(
        mine.variables, theirs.variables
    ):
        if shape != ref_shape:
            raise ShapeError(
                f"{here} variable {path!r} has shape {shape}, {there} has {ref_shape}"
            )
        if dtype != ref_dtype:
            raise DtypeError(
                f"{here} variable {path!r} has dtype {dtype}, {there} has {ref_dtype}"
            )


def check_layout(mine: Layout, label: str, ref: Layout, ref_label: str) -> None:
    """Raise a :class:`PolyakError` naming the first layer where ``mine`` leaves ``ref``."""
    for position, (layer, ref_layer) in enumerate(zip(mine.layers, ref.layers)):
        here = f"{label} {_describe(layer, position)}"
        there = f"{ref_label} {_describe(ref_layer, position)}"
        if layer.kind != ref_layer.kind or _base_name(layer.name) != _base_name(ref_layer.name):
            raise StructureError(f"{here} does not match {there}")
        _check_variables(layer, ref_layer, here, there)
    if len(mine.layers) != len(ref.layers):
        longer, extra = (
            (label, mine.layers) if len(mine.layers) > len(ref.layers) else (ref_label, ref.layers)
        )
        first = min(len(mine.layers), len(ref.layers))
        raise StructureError(
            f"{label} has {len(mine.layers)} layers but {ref_label} has {len(ref.layers)}: "
            f"{longer} has the extra {_describe(extra[first], first)}"
        )
    if mine.count != ref.count:
        raise StructureError(
            f"{label} has {mine.count} weight arrays but {ref_label} has {ref.count}"
        )


def check_all(models: Sequence[Any], name: str) -> Layout:
    """Check that every model has the architecture of ``models[0]``; return that one."""
    ref = layout(models[0], f"{name}[0]")
    for i, model in enumerate(models[1:], 1):
        check_layout(layout(model, f"{name}[{i}]"), f"{name}[{i}]", ref, f"{name}[0]")
    return ref


def nonempty(items: Any, name: str) -> list[Any]:
    """``items`` as a non-empty list; a single path or object is refused, naming ``name``."""
    if isinstance(items, (str, os.PathLike)) or not isinstance(items, Iterable):
        raise PolyakError(f"{name} must be a list, got a single {type(items).__name__}")
    items = list(items)
    if not items:
        raise EmptyInputError(f"{name} is empty: nothing to average")
    return items


def empty_copy(model: Any, label: str) -> Any:
    """A clone of ``model``'s architecture, compiled like ``model`` when it is compiled."""
    clone = keras.models.clone_model(model)
    if len(clone.weights) != len(model.weights):
        raise PolyakError(
            f"keras.models.clone_model({label}) made a model with {len(clone.weights)} weight "
            f"arrays instead of {len(model.weights)}: give the model an Input (or implement "
            "get_config/from_config for a subclassed model) so it can be cloned built"
        )
    if model.compiled:
        # A fresh optimizer: the snapshots' optimizer states do not belong to their average.
        clone.compile_from_config(model.get_compile_config())
    return clone
