"""Pytree flattening with paths, so that every error can name the leaf it is about."""

from __future__ import annotations

from typing import Any

import optree

from polyak._errors import StructureError

__all__ = ["flatten", "where", "check_same_structure"]


def flatten(tree: Any) -> tuple[list[Any], list[optree.PyTreeAccessor], optree.PyTreeSpec]:
    """Leaves, their accessors and the treespec of ``tree`` (``None`` is an empty node)."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree)
    return leaves, accessors, spec


def where(accessor: optree.PyTreeAccessor, root: str = "params_list[0]") -> str:
    """A leaf's location as code: ``params_list[3]['dense']['kernel']``."""
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
    mine = {a.codify(""): a for a in accessors}
    ref = {a.codify(""): a for a in ref_accessors}
    missing = sorted(set(ref) - set(mine))
    unexpected = sorted(set(mine) - set(ref))
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} leaves: {_preview(root, missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} leaves: {_preview(root, unexpected)}")
    if not parts:
        # Same leaf paths, different containers (list vs tuple, dict vs OrderedDict, order).
        parts.append(f"structure {_clip(str(spec))} != {_clip(str(ref_spec))}")
    raise StructureError(f"{root} does not match {ref_root}: " + "; ".join(parts))


def _preview(root: str, paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(root + p for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
