"""One leaf of an online average: the first copy, the checks and the fold.

The library-specific work (in-place numpy and torch folds, functional JAX ones, dtype rules,
rounding back) is :mod:`polyak._backend`'s; this module applies the int policy and names the
leaf in errors. Float leaves accumulate in float32 when they are narrower (bf16, f16, fp8)
and in their own dtype otherwise (or as ``accumulate_dtype`` raises it); complex ones in at
least complex64; int/bool leaves follow the int policy (float64 for ``"average"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from polyak import _backend
from polyak._errors import DtypeError, ShapeError
from polyak._kernel import int_policy_error

__all__ = ["as_array", "first", "check", "fold_all", "read", "copy"]


def as_array(leaf: Any) -> Any:
    """Numpy-like leaves (numbers, numpy scalars) as numpy arrays; torch tensors detached."""
    return _backend.get(leaf).as_array(leaf)


def first(x: Any, int_policy: str, path: str, accumulate_dtype: Any = None) -> Any:
    """The accumulator after the first snapshot: a private, contiguous copy of ``x``.

    Raises:
        DtypeError: ``x`` is not a number type, is an int/bool leaf under
            ``int_policy="error"``, or ``accumulate_dtype`` is not a float or complex dtype.
    """
    be = _backend.get(x)
    kind = be.kind(x.dtype)
    if kind == "other":
        raise DtypeError(f"{path}: dtype {x.dtype} cannot be averaged")
    if kind == "int":
        if int_policy == "error":
            raise int_policy_error(path, x.dtype)
        dtype = be.int_acc_dtype() if int_policy == "average" else x.dtype
    else:
        dtype = be.acc_dtype(x.dtype, accumulate_dtype)
    return be.copy(x, dtype)


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
    be, x_be = _backend.get(acc), _backend.get(x)
    now, then = x_be.kind(x.dtype), be.kind(first_dtype)
    if now != then:
        raise DtypeError(
            f"{path()}: dtype {x.dtype} ({now}) != {first_dtype} ({then}) in the first snapshot"
        )
    # Converting to another library or device at every step would copy the parameters off
    # their device, which online averaging exists to avoid: a change is an error.
    if x_be.placement(x) != be.placement(acc):
        raise DtypeError(
            f"{path()}: a {x_be.describe(x)}, but the average is kept as a {be.describe(acc)} "
            "(like the first snapshot); pass every snapshot as the same array type and device"
        )


def fold_all(
    accs: list[Any], xs: list[Any], decay: float, int_policy: str, workspace: dict[Any, Any]
) -> list[Any]:
    """``acc <- decay * acc + (1 - decay) * x`` for every float leaf, each library's leaves
    in one :meth:`~polyak._backend.Backend.fold_many` call; int leaves by the int policy
    (``"average"`` ones have a float accumulator and fold). Numpy and torch accumulators are
    updated in place and returned."""
    new = list(accs)
    groups: dict[_backend.Backend, list[int]] = {}
    for j, acc in enumerate(accs):
        be = _backend.get(acc)
        if be.kind(acc.dtype) == "int":  # "last" or "first"
            if int_policy != "first":
                new[j] = be.keep_int(acc, xs[j])
        else:
            groups.setdefault(be, []).append(j)
    for be, idx in groups.items():
        folded = be.fold_many([accs[j] for j in idx], [xs[j] for j in idx], decay, workspace)
        for j, acc in zip(idx, folded):
            new[j] = acc
    return new


def read(acc: Any, dtype: Any) -> Any:
    """A new array of ``dtype`` holding the average, rounded once (half to even for ints,
    clipped to their range, as ``polyak.average`` does)."""
    return _backend.get(acc).cast(acc, dtype)


def copy(acc: Any) -> Any:
    """A copy of an accumulator that later in-place updates leave alone."""
    return _backend.get(acc).copy(acc)
