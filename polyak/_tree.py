"""Pytree flattening with paths, so that every error can name the leaf it is about."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import optree

from polyak._errors import PolyakError, StructureError

__all__ = ["flatten", "where", "check_same_structure", "path_mismatch", "refuse_model"]


def refuse_model(tree: Any, where: str) -> None:
    """Raise a PolyakError saying what to pass when ``tree`` is a torch module or a Keras
    model: a pytree library sees one opaque leaf in a model, whose error ("dtype object
    cannot be averaged") would not say what went wrong.

    The frameworks are never imported here: a model exists only if its framework is in
    ``sys.modules`` already.
    """
    torch = sys.modules.get("torch")
    module = getattr(getattr(torch, "nn", None), "Module", None)
    if module is not None and isinstance(tree, module):
        raise PolyakError(
            f"{where} is a torch {type(tree).__name__} module, not a pytree of arrays: pass "
            "its model.state_dict(), or average the module itself with "
            "polyak.torch.ModelAverager(model)"
        )
    keras_model = getattr(sys.modules.get("keras"), "Model", None)
    if isinstance(keras_model, type) and isinstance(tree, keras_model):
        raise PolyakError(
            f"{where} is a Keras {type(tree).__name__} model, not a pytree of arrays: pass "
            "model.get_weights() (and model.set_weights(average) after), or use "
            "polyak.keras.average_weights / polyak.keras.WeightAveraging"
        )


def flatten(
    tree: Any, root: str = "snapshots[0]"
) -> tuple[list[Any], list[optree.PyTreeAccessor], optree.PyTreeSpec]:
    """Leaves, their accessors and the treespec of ``tree`` (``None`` is an empty node).

    Raises PolyakError when ``tree`` is a torch module or Keras model (named ``root``)."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree)
    if len(leaves) == 1 and leaves[0] is tree:  # a lone leaf: maybe a model passed by mistake
        refuse_model(tree, root)
    return leaves, accessors, spec


def where(accessor: optree.PyTreeAccessor, root: str = "snapshots[0]") -> str:
    """A leaf's location as code: ``snapshots[3]['dense']['kernel']``."""
    return accessor.codify(root)


def check_same_structure(
    spec: optree.PyTreeSpec,
    accessors: list[optree.PyTreeAccessor],
    ref_spec: optree.PyTreeSpec,
    ref_accessors: list[optree.PyTreeAccessor],
    root: str,
    ref_root: str,
) -> None:
    """Raise :class:`StructureError` listing every missing and unexpected leaf, sorted."""
    if spec == ref_spec:
        return
    error = path_mismatch(accessors, ref_accessors, root, ref_root)
    if error is not None:
        raise error
    # Same leaf paths, different containers (list vs tuple, dict vs OrderedDict, order).
    raise StructureError(
        f"{root} does not match {ref_root}: structure {_clip(str(spec))} != {_clip(str(ref_spec))}"
    )


def path_mismatch(
    accessors: list[optree.PyTreeAccessor],
    ref_accessors: list[optree.PyTreeAccessor],
    root: str,
    ref_root: str,
) -> StructureError | None:
    """A :class:`StructureError` listing missing and unexpected leaf paths, sorted; ``None``
    when both trees have the same leaf paths (their containers may still differ)."""
    mine = {a.codify("") for a in accessors}
    ref = {a.codify("") for a in ref_accessors}
    missing = sorted(ref - mine)
    unexpected = sorted(mine - ref)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} leaves: {_preview(root, missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} leaves: {_preview(root, unexpected)}")
    if not parts:
        return None
    return StructureError(f"{root} does not match {ref_root}: " + "; ".join(parts))


def check_names(expected: Iterable[str], given: Iterable[str], what: str, hint: str = "") -> None:
    """Raise a :class:`StructureError` that starts with ``what`` and lists, sorted, every name
    ``given`` lacks and every one it has beyond ``expected``; nothing when the sets agree."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise StructureError(f"{what}: missing {missing}, unexpected {unexpected}{hint}")


def _preview(root: str, paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(root + p for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
