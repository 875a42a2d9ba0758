"""What the torch-zip and DCP readers share: a table ``name -> (dtype, shape, location)``.

Each reader fills ``_tensors`` when it opens its checkpoint and implements ``read`` (and
``close``); the table answers the rest of the stream core's reader protocol.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from polyak.safetensors._format import Closing

__all__ = ["TensorTable"]


class TensorTable(Closing):
    """Reader-protocol answers from ``self._tensors``: names, dtypes, shapes and sizes."""

    _tensors: dict[str, tuple[np.dtype, tuple[int, ...], Any]]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        dtype, shape, _ = self._tensors[name]
        return dtype, shape

    def read(self, name: str, elem_start: int, out: np.ndarray) -> None:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return sum(math.prod(s) * d.itemsize for d, s, _ in self._tensors.values())

    def read_tensor(self, name: str) -> np.ndarray:
        """A new array holding the whole tensor ``name``."""
        dtype, shape, _ = self._tensors[name]
        out = np.empty(shape, dtype)
        self.read(name, 0, out)
        return out
