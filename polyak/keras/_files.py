"""Saved Keras model files: which kinds are accepted, and loading one with its name in errors."""

from __future__ import annotations

import gc
import os
from typing import Any

import keras

from polyak._errors import PolyakError

__all__ = ["ModelFileError", "check_files", "load", "release"]


class ModelFileError(PolyakError):
    """A model file that is missing, of an unknown kind, or that Keras cannot load."""


def check_files(paths: list[str], with_model: bool) -> None:
    """Refuse missing files, unknown kinds, and ``.weights.h5`` files without a model."""
    for i, path in enumerate(paths):
        if not os.path.isfile(path):
            raise ModelFileError(f"paths[{i}] {path!r} does not exist or is not a file")
        if path.endswith(".weights.h5"):
            if not with_model:
                raise ModelFileError(
                    f"paths[{i}] {path!r} holds weights only: pass model=, a model of the "
                    "same architecture, to load it into"
                )
        elif not path.endswith((".keras", ".h5")):
            raise ModelFileError(f"paths[{i}] {path!r} is not a .keras, .h5 or .weights.h5 file")


def load(path: str, holder: Any, label: str, *, compile: bool) -> Any:
    """Load ``path`` into ``holder`` (``load_weights``), or as a new model when it is None."""
    try:
        if holder is not None:
            holder.load_weights(path)
            return holder
        return keras.saving.load_model(path, compile=compile)
    except Exception as error:  # Keras raises many kinds; add the file to whichever it is.
        raise ModelFileError(
            f"{label}: Keras could not load it: {type(error).__name__}: {error}"
        ) from error


def release() -> None:
    """Free a dropped model now: Keras models hold reference cycles, which wait for gc."""
    gc.collect()
