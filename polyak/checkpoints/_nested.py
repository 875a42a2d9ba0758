"""Finding the weights inside a nested checkpoint object (``key="state_dict"``, ``"a.b"``).

A checkpoint often holds more than weights: Lightning saves ``{"state_dict": ..., "epoch":
..., "optimizer_states": ...}``, timm ``{"state_dict": ..., "state_dict_ema": ...}``. The
weights are one mapping of names to tensors, chosen by a dotted ``key``; without a key the top
level must be that mapping. Anything else is an error that lists the keys that would work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from polyak.checkpoints._errors import KeyChoiceError

__all__ = ["select", "candidate_keys"]

_MAX_DEPTH = 6


def _is_tensor_map(obj: Any, is_tensor: Callable[[Any], bool]) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(is_tensor(v) for v in obj.values())


def candidate_keys(obj: Any, is_tensor: Callable[[Any], bool]) -> list[str]:
    """Dotted keys under ``obj`` whose value is a non-empty mapping of names to tensors."""
    found: list[str] = []

    def walk(node: Any, prefix: str, depth: int) -> None:
        if depth > _MAX_DEPTH or not isinstance(node, Mapping):
            return
        for k, v in node.items():
            if not isinstance(k, str):
                continue
            path = f"{prefix}{k}"
            if _is_tensor_map(v, is_tensor):
                found.append(path)
            else:
                walk(v, path + ".", depth + 1)

    walk(obj, "", 0)
    return found


def _hint(obj: Any, is_tensor: Callable[[Any], bool]) -> str:
    keys = candidate_keys(obj, is_tensor)
    if not keys:
        return "no key in it holds a mapping of names to tensors"
    shown = ", ".join(keys[:10]) + (f", ... ({len(keys) - 10} more)" if len(keys) > 10 else "")
    return f"keys holding tensor mappings: {shown}; pass --key {keys[0]} (key={keys[0]!r})"


def select(
    obj: Any, key: str | None, path: str, is_tensor: Callable[[Any], bool]
) -> dict[str, Any]:
    """The mapping of tensor names to tensors at dotted ``key`` of ``obj`` (the top if None).

    Raises:
        KeyChoiceError: ``key`` is missing, or the selected value is not a flat mapping of
            names to tensors; the message lists non-tensor entries (sorted) and the keys that
            hold tensor mappings.
    """
    node = obj
    if key is not None:
        walked: list[str] = []
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                where = ".".join(walked) or "the top level"
                raise KeyChoiceError(
                    f"{path}: key {key!r} not found (no {part!r} in {where}); "
                    + _hint(obj, is_tensor),
                    candidate_keys(obj, is_tensor),
                )
            node = node[part]
            walked.append(part)
    where = f"key {key!r}" if key is not None else "the top level"
    if not isinstance(node, Mapping):
        raise KeyChoiceError(
            f"{path}: {where} is a {type(node).__name__}, not a mapping of names to tensors; "
            + _hint(obj, is_tensor),
            candidate_keys(obj, is_tensor),
        )
    bad = sorted(str(k) for k, v in node.items() if not (isinstance(k, str) and is_tensor(v)))
    if bad or not node:
        shown = ", ".join(map(repr, bad[:10])) + (" ..." if len(bad) > 10 else "")
        what = f"{len(bad)} entries that are not tensors: {shown}" if bad else "no tensors"
        raise KeyChoiceError(
            f"{path}: {where} holds {what}; polyak merges one mapping of tensors, "
            + _hint(obj, is_tensor),
            candidate_keys(obj, is_tensor),
        )
    return dict(node)
