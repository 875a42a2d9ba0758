"""One leaf of an online average, in the leaf's own array library.

Three paths, picked by the accumulator's type:

* numpy: updated in place, in cache-sized chunks through one reusable scratch buffer, so an
  update reads the snapshot and reads and writes the accumulator once, like a copy, and
  allocates nothing after the first;
* torch (CPU or GPU): updated in place with one fused ``lerp_`` on the tensor's device; when
  the average is wider than the snapshot (float32 for bf16), the snapshot is cast chunk by
  chunk through a small scratch buffer on CPU, and as it is read by the kernel on GPUs
  (except float8, which torch does not promote: it is cast into a temporary first);
* any other array-API library (JAX, CuPy): new arrays each update, as JAX arrays are
  immutable.

Float leaves accumulate in float32 when they are narrower (bf16, f16, fp8) and in their own
dtype otherwise; complex ones in at least complex64; int/bool leaves follow the int policy
(float64 for ``"average"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from polyak import _kernel
from polyak._arrays import detach, namespace, widest_float
from polyak._errors import DtypeError, ShapeError

__all__ = [
    "as_array",
    "kind",
    "dtype_kind",
    "first",
    "check",
    "fold",
    "read",
    "copy",
    "dtype_name",
    "dtype_from_name",
    "to_library_of",
]


def as_array(leaf: Any) -> Any:
    """Numpy-like leaves (numbers, numpy scalars) as numpy arrays; torch tensors detached."""
    if namespace(leaf) is None:
        return np.asarray(leaf)
    return detach(leaf)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def dtype_kind(dtype: Any) -> str:
    """``"float"``, ``"complex"``, ``"int"`` (ints and bools) or ``"other"``, for numpy,
    ml_dtypes and torch dtypes alike."""
    if type(dtype).__module__.split(".")[0] == "torch":
        if dtype.is_complex:
            return "complex"
        if dtype.is_floating_point:
            return "float"
        integral = str(dtype).removeprefix("torch.").startswith(("int", "uint", "bool"))
        return "int" if integral else "other"
    try:
        return _kernel.dtype_kind(np.dtype(dtype))
    except TypeError:
        return "other"


def kind(x: Any) -> str:
    """The :func:`dtype_kind` of a leaf."""
    return dtype_kind(x.dtype)


def _acc_dtype(x: Any, leaf_kind: str, int_policy: str) -> Any:
    """The dtype the running average of ``x`` is kept in."""
    if isinstance(x, np.ndarray):
        if leaf_kind == "int":
            return np.dtype(np.float64) if int_policy == "average" else x.dtype
        return _kernel.accumulator_dtype(x.dtype)
    if _is_torch(x):
        import torch

        lib = torch
    else:
        lib = namespace(x)
    if leaf_kind == "int":
        return widest_float(lib) if int_policy == "average" else x.dtype
    if leaf_kind == "complex":
        return lib.complex128 if x.dtype == lib.complex128 else lib.complex64
    return lib.float64 if x.dtype == lib.float64 else lib.float32


def first(x: Any, int_policy: str, path: str) -> Any:
    """The accumulator after the first snapshot: a private, contiguous copy of ``x``.

    Raises:
        DtypeError: ``x`` is not a number type, or is an int/bool leaf under
            ``int_policy="error"``.
    """
    leaf_kind = kind(x)
    if leaf_kind == "other":
        raise DtypeError(f"{path}: dtype {x.dtype} cannot be averaged")
    if leaf_kind == "int" and int_policy == "error":
        raise DtypeError(
            f"{path}: {x.dtype} leaf cannot be averaged with int_policy='error' "
            "(use 'last', 'first' or 'average')"
        )
    dtype = _acc_dtype(x, leaf_kind, int_policy)
    if isinstance(x, np.ndarray):
        return np.array(x, dtype=dtype, order="C", copy=True)
    if _is_torch(x):
        import torch

        return x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    return namespace(x).astype(x, dtype, copy=True)


def _placement(x: Any) -> Any:
    """What must stay the same from snapshot to snapshot: the array type, and for torch the
    device. Any torch tensor counts as one type: a frozen ``nn.Parameter`` (not detached,
    as it needs no grad) and the plain tensor its average is kept in must match."""
    if _is_torch(x):
        return ("torch", x.device)
    return type(x)


def _array_type(x: Any) -> str:
    if _is_torch(x):
        return f"torch.Tensor on {x.device}"
    return f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"


def check(acc: Any, x: Any, first_dtype: Any, path: Callable[[], str]) -> None:
    """Check a later snapshot's leaf against the average of the earlier ones; ``path()``
    names the leaf in the error (built only then: this runs for every leaf of every update).

    Raises:
        ShapeError: the shape changed.
        DtypeError: the kind (float, complex, int) or the array library or device changed.
    """
    if tuple(x.shape) != tuple(acc.shape):
        raise ShapeError(
            f"{path()}: shape {tuple(x.shape)} != {tuple(acc.shape)} in the first snapshot"
        )
    now, then = kind(x), dtype_kind(first_dtype)
    if now != then:
        raise DtypeError(
            f"{path()}: dtype {x.dtype} ({now}) != {first_dtype} ({then}) in the first snapshot"
        )
    # Converting to another library or device at every step would copy the parameters off
    # their device, which online averaging exists to avoid: a change is an error.
    if _placement(x) != _placement(acc):
        raise DtypeError(
            f"{path()}: a {_array_type(x)}, but the average is kept as a {_array_type(acc)} "
            "(like the first snapshot); pass every snapshot as the same array type and device"
        )


def fold(acc: Any, x: Any, decay: float, int_policy: str, workspace: dict[Any, Any]) -> Any:
    """``acc <- decay * acc + (1 - decay) * x`` (or the int policy); returns the accumulator,
    the same object for numpy and torch."""
    if dtype_kind(acc.dtype) == "int":  # "last" or "first"; "average" accumulates in float64
        return _fold_int(acc, x, int_policy)
    weight = 1.0 - decay
    if isinstance(acc, np.ndarray):
        _fold_numpy(acc, x, decay, weight, workspace)
        return acc
    if _is_torch(acc):
        if decay == 0.0:
            acc.copy_(x)  # e.g. swa before its start: the average is the newest snapshot
        elif x.dtype == acc.dtype:
            acc.lerp_(x, weight)  # one fused pass
        elif acc.device.type == "cpu":
            _fold_torch_cpu_cast(acc, x, weight, workspace)
        else:
            _fold_torch_device_cast(acc, x, decay, weight)
        return acc
    xp = namespace(acc)
    if decay == 0.0:
        return xp.astype(x, acc.dtype, copy=True)
    return decay * acc + weight * xp.astype(x, acc.dtype)


def _scratch(workspace: dict[Any, Any], dtype: np.dtype) -> np.ndarray:
    scratch = workspace.get(dtype)
    if scratch is None:
        scratch = workspace[dtype] = np.empty(_kernel.CHUNK_ELEMENTS, dtype=dtype)
    return scratch


def _fold_numpy(
    acc: np.ndarray, x: np.ndarray, decay: float, weight: float, workspace: dict[Any, Any]
) -> None:
    # Chunks of CHUNK_ELEMENTS keep the scaled accumulator and the weighted snapshot in cache,
    # so main memory sees one read of x and one read and write of acc.
    flat_acc = acc.reshape(-1)
    flat_x = np.ascontiguousarray(x).reshape(-1)  # copies only non-contiguous views
    size = flat_acc.size
    if decay == 0.0:  # e.g. swa before its start: the average is the newest snapshot
        np.copyto(flat_acc, flat_x, casting="unsafe")
        return
    scratch = _scratch(workspace, acc.dtype)
    d = acc.dtype.type(decay)
    for start in range(0, size, _kernel.CHUNK_ELEMENTS):
        stop = min(start + _kernel.CHUNK_ELEMENTS, size)
        a = flat_acc[start:stop]
        np.multiply(a, d, out=a)
        _kernel.accumulate(a, flat_x[start:stop], weight, scratch[: stop - start], first=False)


def _fold_torch_cpu_cast(acc: Any, x: Any, weight: float, workspace: dict[Any, Any]) -> None:
    # On CPU, torch casts a mixed-dtype operand (a bf16 snapshot into a float32 average) into
    # a full-size temporary before the arithmetic; copy_ casts without one, so cast chunk by
    # chunk into a small scratch buffer and lerp from there.
    import torch

    chunk = _kernel.CHUNK_ELEMENTS
    scratch = workspace.get(("torch", acc.dtype))
    if scratch is None:
        scratch = workspace[("torch", acc.dtype)] = torch.empty(chunk, dtype=acc.dtype)
    flat_acc, flat_x = acc.view(-1), x.reshape(-1)  # reshape copies only non-contiguous x
    for start in range(0, flat_acc.numel(), chunk):
        a = flat_acc[start : start + chunk]
        s = scratch[: a.numel()]
        s.copy_(flat_x[start : start + chunk])
        a.lerp_(s, weight)


def _fold_torch_device_cast(acc: Any, x: Any, decay: float, weight: float) -> None:
    # Accelerator kernels cast a mixed-dtype operand as they read it, so no temporary; but
    # torch refuses to promote float8 with anything ("Promotion for Float8 Types is not
    # supported"), so float8 snapshots are cast to the accumulator's dtype first.
    if x.dtype.is_floating_point and x.dtype.itemsize == 1:
        x = x.to(acc.dtype)
    acc.mul_(decay).add_(x, alpha=weight)


def _fold_int(acc: Any, x: Any, int_policy: str) -> Any:
    if int_policy == "first":
        return acc
    if isinstance(acc, np.ndarray):
        np.copyto(acc, x)
        return acc
    if _is_torch(acc):
        acc.copy_(x)
        return acc
    return namespace(x).asarray(x, copy=True)


def read(acc: Any, dtype: Any) -> Any:
    """A new array of ``dtype`` holding the average, rounded once (half to even for ints,
    clipped to their range, as ``polyak.average`` does)."""
    if dtype_kind(dtype) == "int" and dtype_kind(acc.dtype) == "float":
        return _round_int(acc, dtype)
    if isinstance(acc, np.ndarray):
        return acc.astype(dtype, copy=True)
    if _is_torch(acc):
        return acc.to(dtype=dtype, copy=True)
    return namespace(acc).astype(acc, dtype, copy=True)


def _round_int(acc: Any, dtype: Any) -> Any:
    if isinstance(acc, np.ndarray):
        rounded = np.rint(acc)  # half to even
        if np.dtype(dtype).kind == "b":
            return rounded != 0
        info = np.iinfo(dtype)
        return np.clip(rounded, info.min, info.max).astype(dtype)
    if _is_torch(acc):
        import torch

        rounded = torch.round(acc)  # half to even
        if dtype == torch.bool:
            return rounded != 0
        info = torch.iinfo(dtype)
        return rounded.clamp_(info.min, info.max).to(dtype)
    xp = namespace(acc)
    rounded = xp.round(acc)  # the array API rounds half to even
    if dtype == xp.bool:
        return rounded != 0
    info = xp.iinfo(dtype)
    return xp.astype(xp.clip(rounded, info.min, info.max), dtype)


def copy(acc: Any) -> Any:
    """A copy of an accumulator that later in-place updates leave alone."""
    if isinstance(acc, np.ndarray):
        return np.array(acc, order="C", copy=True)
    if _is_torch(acc):
        import torch

        return acc.detach().clone(memory_format=torch.contiguous_format)
    return namespace(acc).asarray(acc, copy=True)


def dtype_name(dtype: Any) -> str:
    """``"bfloat16"`` for numpy's, ml_dtypes', JAX's and torch's bfloat16 alike."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, like: Any) -> Any:
    """The dtype called ``name`` in the array library of ``like``.

    Raises:
        DtypeError: no such dtype.
    """
    if _is_torch(like):
        import torch

        dtype = getattr(torch, str(name), None)
        if not isinstance(dtype, torch.dtype):
            raise DtypeError(f"unknown torch dtype {name!r}")
        return dtype
    try:
        return np.dtype(name)  # ml_dtypes, imported by polyak._kernel, registers bfloat16...
    except TypeError:
        raise DtypeError(f"unknown dtype {name!r}") from None


def to_library_of(acc: np.ndarray, like: Any) -> Any:
    """Move an accumulator read from a file (numpy) into the library and device of ``like``."""
    if isinstance(like, np.ndarray):
        return np.array(acc, order="C", copy=True)  # loaded arrays may be read-only maps
    if _is_torch(like):
        import torch

        return torch.from_numpy(np.array(acc, order="C", copy=True)).to(like.device)
    import array_api_compat

    return namespace(like).asarray(acc, device=array_api_compat.device(like))
