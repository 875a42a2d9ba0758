"""Argument parsers of the safetensors adapter: dtype names, accumulation dtypes, sizes."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np

from polyak import _kernel
from polyak._errors import DtypeError, PolyakError
from polyak._types import PathLike
from polyak.safetensors._format import DTYPES

__all__ = ["parse_dtype", "parse_accumulate_dtype", "parse_size", "shard_size"]

_DTYPE_NAMES = {
    **{k.lower(): v for k, v in DTYPES.items()},
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "fp16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "fp32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "fp64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


def _lookup(dtype: Any) -> np.dtype | None:
    """The numpy dtype a name (any case, as in :data:`_DTYPE_NAMES`) or dtype-like gives."""
    if isinstance(dtype, str):
        return _DTYPE_NAMES.get(dtype.strip().lower())
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def parse_dtype(dtype: Any) -> np.dtype | None:
    """The float output dtype named by ``dtype`` ("bf16", "bfloat16", "F16", np.float16...).

    Raises:
        DtypeError: not a float dtype safetensors can store.
    """
    if dtype is None:
        return None
    found = _lookup(dtype)
    if found is None or _kernel.dtype_kind(found) != "float" or found not in DTYPES.values():
        floats = sorted(k for k, v in _DTYPE_NAMES.items() if _kernel.dtype_kind(v) == "float")
        raise DtypeError(
            f"dtype={dtype!r} is not a float dtype safetensors can store; use one of "
            f"{', '.join(floats)}"
        )
    return found


def parse_accumulate_dtype(dtype: Any) -> np.dtype | None:
    """The accumulation dtype named by ``dtype`` ("float64", "fp64", np.float64...).

    Only numpy's own floats: a complex accumulator would drop its imaginary part at the end
    (with a ComplexWarning), and bf16/fp8 cannot raise float32's precision.

    Raises:
        DtypeError: not one of numpy's float dtypes.
    """
    if dtype is None:
        return None
    found = _lookup(dtype)
    if found is None or found.kind != "f":
        raise DtypeError(
            f"accumulate_dtype={dtype!r} cannot be used: give float64 (or fp64, double) to "
            "accumulate in float64; float32 is already the least polyak accumulates in"
        )
    return found


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(size: int | str | None) -> int | None:
    """Bytes from ``5000000``, ``"5GB"`` (10**9, as Hugging Face counts) or ``"512MiB"``.

    Raises:
        PolyakError: not a positive size.
    """
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise PolyakError(
                f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'"
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise PolyakError(f"max_shard_size must be positive, got max_shard_size={size!r}")
    return value


def shard_size(max_shard_size: int | str | None, outputs: Sequence[PathLike]) -> int | None:
    """``max_shard_size`` in bytes, refused when no output is a directory (it would be
    silently ignored: a ``.safetensors`` output is always one file).

    Raises:
        PolyakError: not a positive size, or every output is a ``.safetensors`` file.
    """
    size = parse_size(max_shard_size)
    if size is not None and all(os.fspath(o).endswith(".safetensors") for o in outputs):
        raise PolyakError(
            f"max_shard_size={max_shard_size!r} applies to a directory output, but "
            f"{', '.join(os.fspath(o) for o in outputs)} is a single .safetensors file; name a "
            "directory to get a sharded checkpoint"
        )
    return size
