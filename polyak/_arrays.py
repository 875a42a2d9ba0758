"""Which array library a leaf belongs to, without importing any framework.

numpy arrays, numpy scalars and plain Python numbers take polyak's own numpy kernel.
Anything else that speaks the array API (torch, JAX, CuPy, ...) is computed in its own
namespace through array-api-compat, so results stay on the leaf's device and type.
array-api-compat recognises a framework's arrays by looking in ``sys.modules``, so asking
about a leaf never imports torch or JAX.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["namespace", "detach", "is_numpy_like", "widest_float"]


def is_numpy_like(x: Any) -> bool:
    """True for numpy arrays and scalars, Python numbers and nested lists of them."""
    return isinstance(x, (np.ndarray, np.generic, int, float, complex, bool, list, tuple)) or (
        not array_api_compat.is_array_api_obj(x)
    )


def namespace(x: Any) -> ModuleType | None:
    """The array-API namespace of a non-numpy array, or ``None`` for numpy-like leaves."""
    if is_numpy_like(x):
        return None
    return array_api_compat.array_namespace(x)


def detach(x: Any) -> Any:
    """Drop autograd history from torch tensors (``requires_grad`` parameters); else ``x``."""
    if array_api_compat.is_torch_array(x) and x.requires_grad:
        return x.detach()
    return x


def widest_float(xp: ModuleType) -> Any:
    """float64 where the library has it; JAX without ``jax_enable_x64`` only has float32."""
    if array_api_compat.is_jax_namespace(xp):
        import jax  # already imported: the leaf is a JAX array

        if not jax.config.jax_enable_x64:
            return xp.float32
    return xp.float64
