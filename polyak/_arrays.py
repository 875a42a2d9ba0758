"""Which array library a leaf belongs to: thin answers from :mod:`polyak._backend`.

Kept for callers that still ask for an array-API namespace; new code asks
:func:`polyak._backend.get` for the leaf's backend instead.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from polyak import _backend

__all__ = ["namespace", "detach", "is_numpy_like", "widest_float"]


def is_numpy_like(x: Any) -> bool:
    """True for numpy arrays and scalars, Python numbers and nested lists of them."""
    return isinstance(_backend.get(x), _backend.NumpyBackend)


def namespace(x: Any) -> ModuleType | None:
    """The array-API namespace of a non-numpy array, or ``None`` for numpy-like leaves."""
    backend = _backend.get(x)
    return None if isinstance(backend, _backend.NumpyBackend) else backend.xp


def detach(x: Any) -> Any:
    """Drop autograd history from torch tensors (``requires_grad`` parameters); else ``x``."""
    backend = _backend.get(x)
    return x if isinstance(backend, _backend.NumpyBackend) else backend.as_array(x)


def widest_float(xp: ModuleType) -> Any:
    """float64 where the library has it; JAX without ``jax_enable_x64`` only has float32."""
    return _backend.Backend(xp).widest_float()
