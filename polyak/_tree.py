"""Pytree flattening with paths, so that every error can name the leaf it is about."""

from __future__ import annotations

from typing import Any

import optree

from polyak._errors import StructureError

__all__ = ["flatten", "where", "check_same_structure", "path_mismatch"]


def flatten(tree: Any) -> tuple[list[Any], list[optree.PyTreeAccessor], optree.PyTreeSpec]:
    """Leaves, their accessors and the treespec of ``tree`` (``None`` is an empty node)."""
    accessors, leaves, spec = optree.tree_flatten_with_accessor(tree)
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


def _preview(root: str, paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(root + p for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
