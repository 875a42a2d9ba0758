"""Errors of the checkpoint readers.

Both subclass :class:`polyak.safetensors.CheckpointError` (a :class:`polyak.PolyakError`), so
code that already catches "this path is not a usable checkpoint" catches these too.
"""

from __future__ import annotations

from polyak.safetensors import CheckpointError

__all__ = ["CheckpointError", "UnsafeCheckpointError", "KeyChoiceError", "ConfigWarning"]


class UnsafeCheckpointError(CheckpointError):
    """A torch checkpoint's pickle names something outside the tensor allow-list.

    Nothing from it was run: the restricted unpickler refuses the name before any call.
    """


class KeyChoiceError(CheckpointError):
    """The weights inside a nested checkpoint are ambiguous or missing: pass (another) ``key``.

    Attributes:
        candidates: the dotted keys that hold mappings of names to tensors (may be empty).
    """

    def __init__(self, message: str, candidates: list[str] | None = None) -> None:
        super().__init__(message)
        self.candidates = list(candidates or [])


class ConfigWarning(UserWarning):
    """The ``config.json`` files of the merged model folders differ beyond bookkeeping fields
    (``transformers_version``, ``dtype``...): the inputs may not be the same model."""
