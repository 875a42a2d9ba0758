"""``polyak.average`` and ``polyak.weights``: the offline weighted average of pytrees."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from polyak import _kernel, _tree
from polyak._arrays import detach, namespace, widest_float
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError
from polyak.schedules import resolve

__all__ = ["average", "weights", "ScheduleLike"]

Tree = TypeVar("Tree")
ScheduleLike = (
    "Schedule | str | Sequence[float] | np.ndarray | Callable[[int], Sequence[float]] | None"
)


def weights(schedule: ScheduleLike = None, n: int = 1, *, normalize: bool = True) -> np.ndarray:
    """The float64 weights, oldest first, that :func:`average` uses for ``n`` snapshots.

    Args:
        schedule: anything :func:`average` accepts (``None`` is the plain mean).
        n: the number of snapshots.
        normalize: divide by the sum of the weights, as :func:`average` does by default.

    Returns:
        A float64 array of ``n`` weights.

    Raises:
        ScheduleError: the schedule cannot be resolved.
        WeightsError: NaN/inf weights, a wrong count, or a zero/negative sum when normalizing.
        EmptyInputError: ``n < 1``.

    Example:
        >>> import polyak
        >>> polyak.weights("linear", 4)
        array([0.1, 0.2, 0.3, 0.4])
    """
    return resolve(schedule).weights(n, normalize=normalize)


def average(
    params_list: Sequence[Tree],
    schedule: ScheduleLike = None,
    *,
    normalize: bool = True,
    int_policy: str = "last",
    accumulate_dtype: np.dtype | str | None = None,
) -> Tree:
    """The weighted average of parameter pytrees, oldest first.

    Each float leaf is accumulated as ``sum_i w_i * x_i`` in float32 (float16, bfloat16,
    float8 and float32 leaves) or float64 (float64 leaves), chunk by chunk so that the
    snapshots are never stacked, and rounded once to the leaves' dtype. Leaves may be numpy
    arrays, Python numbers, or arrays of any array-API library (torch tensors, JAX arrays),
    which are computed in their own library and stay on their device.

    Args:
        params_list: a non-empty sequence of pytrees with identical structure (nested
            dict / OrderedDict / list / tuple / namedtuple; Keras ``get_weights()`` lists,
            torch ``state_dict()`` dicts, JAX/Flax params), index 0 the OLDEST snapshot.
        schedule: ``None``/``"equal"``, a name such as ``"linear"`` or ``"exponential"``, a
            :class:`polyak.Schedule`, explicit weights (oldest first) or a callable
            ``n -> weights``.
        normalize: divide by the sum of the weights. ``False`` uses them as given (task
            arithmetic, post-hoc EMA coefficients, negative weights).
        int_policy: what to do with integer and bool leaves (step counters, BatchNorm
            ``num_batches_tracked``): ``"last"`` takes the newest, ``"first"`` the oldest,
            ``"average"`` averages and rounds half to even, ``"error"`` refuses.
        accumulate_dtype: raise the accumulation precision, e.g. ``"float64"``.

    Returns:
        A pytree of the same structure; each float leaf has the dtype of the inputs and the
        type of the newest snapshot's leaf.

    Raises:
        EmptyInputError: ``params_list`` is empty.
        StructureError: a snapshot's structure differs from ``params_list[0]``.
        ShapeError: a leaf's shape differs, e.g.
            ``params_list[3]['dense']['kernel']: shape (25, 4) != (25, 3)``.
        DtypeError: a leaf's dtype kind differs, or cannot be averaged.
        WeightsError: weights that are NaN/inf, of the wrong count, or sum to <= 0.

    Example:
        >>> import numpy as np, polyak
        >>> snaps = [{"w": np.array([0.0, 2.0])}, {"w": np.array([2.0, 4.0])}]
        >>> polyak.average(snaps)
        {'w': array([1., 3.])}
        >>> polyak.average(snaps, "linear")["w"].round(3)
        array([1.333, 3.333])
    """
    snapshots = _as_list(params_list)
    _kernel.check_int_policy(int_policy)
    w = weights(schedule, len(snapshots), normalize=normalize)

    ref_leaves, ref_acc, ref_spec = _tree.flatten(snapshots[0])
    columns: list[list[Any]] = [[leaf] for leaf in ref_leaves]
    for i, snap in enumerate(snapshots[1:], start=1):
        leaves, acc, spec = _tree.flatten(snap)
        _tree.check_same_structure(
            spec, acc, ref_spec, ref_acc, f"params_list[{i}]", "params_list[0]"
        )
        for column, leaf in zip(columns, leaves):
            column.append(leaf)

    out = [
        _average_leaf(column, w, accessor, int_policy, accumulate_dtype)
        for column, accessor in zip(columns, ref_acc)
    ]
    return ref_spec.unflatten(out)


def _as_list(params_list: Any) -> list[Any]:
    if isinstance(params_list, (Mapping, str, bytes)) or not isinstance(params_list, Iterable):
        raise PolyakError(
            "params_list must be a sequence of pytrees (oldest first), got "
            f"{type(params_list).__name__}; to average one model's snapshots, pass a list"
        )
    snapshots = list(params_list)
    if not snapshots:
        raise EmptyInputError("params_list is empty: nothing to average")
    return snapshots


def _average_leaf(
    column: list[Any],
    w: np.ndarray,
    accessor: Any,
    int_policy: str,
    accumulate_dtype: Any,
) -> Any:
    def at(i: int) -> str:
        return _tree.where(accessor, f"params_list[{i}]")

    xp = namespace(column[-1])
    if xp is not None:
        return _average_leaf_xp(xp, column, w, at, int_policy, accumulate_dtype)

    arrays = []
    for i, leaf in enumerate(column):
        if namespace(leaf) is not None:
            raise DtypeError(
                f"{at(i)}: a {type(leaf).__name__} among numpy leaves; every snapshot's leaf "
                "must come from the same array library"
            )
        try:
            arrays.append(np.asarray(leaf))
        except (TypeError, ValueError) as err:
            raise DtypeError(f"{at(i)}: cannot be read as an array: {err}") from None
    kind = _check_leaves(arrays, [a.shape for a in arrays], at, _kernel.dtype_kind)

    if kind == "int":
        result = _kernel.combine_ints(arrays, w, int_policy, at(len(arrays) - 1))
    else:
        result = _weighted_sum(arrays, w, accumulate_dtype, at)
    newest = column[-1]
    if isinstance(newest, (bool, int, float, complex)) and not isinstance(newest, np.generic):
        return result.item()
    if isinstance(newest, np.generic):
        return result[()]
    return result


def _check_leaves(
    arrays: list[Any], shapes: list[tuple], at: Callable[[int], str], kind_of: Callable
) -> str:
    """Check shapes and dtype kinds against ``params_list[0]``; return the kind."""
    kind = kind_of(arrays[0].dtype)
    for i, (a, shape) in enumerate(zip(arrays, shapes)):
        if tuple(shape) != tuple(shapes[0]):
            raise ShapeError(
                f"{at(i)}: shape {tuple(shape)} != {tuple(shapes[0])} in params_list[0]"
            )
        k = kind_of(a.dtype)
        if k == "other":
            raise DtypeError(f"{at(i)}: dtype {a.dtype} cannot be averaged")
        if k != kind:
            raise DtypeError(
                f"{at(i)}: dtype {a.dtype} ({k}) != {arrays[0].dtype} ({kind}) in params_list[0]"
            )
    return kind


def _weighted_sum(
    arrays: list[np.ndarray], w: np.ndarray, accumulate_dtype: Any, at: Callable[[int], str]
) -> np.ndarray:
    try:
        out_dtype = np.result_type(*[a.dtype for a in arrays])
    except TypeError:
        raise DtypeError(
            f"{at(len(arrays) - 1)}: dtypes {sorted({str(a.dtype) for a in arrays})} have no "
            "common type"
        ) from None
    acc_dtype = _kernel.accumulator_dtype(out_dtype, accumulate_dtype)
    out = np.empty(arrays[0].shape, dtype=out_dtype)
    size = out.size
    # Snapshots with weight 0 are never read: tail(k) and swa(start) skip old checkpoints,
    # and a diverged (NaN) snapshot outside the window cannot poison the average.
    coefficients, divisor = _kernel.split_weights(w)
    active = [(a, float(c)) for a, c in zip(arrays, coefficients) if c != 0]
    if not active or size == 0:
        out[...] = 0
        return out
    flats = [a.reshape(-1) if a.flags.c_contiguous else a.flat for a, _ in active]
    out_flat = out.reshape(-1)
    in_place = out_dtype == acc_dtype
    step = min(size, _kernel.CHUNK_ELEMENTS)
    scratch = np.empty(step, dtype=acc_dtype)
    acc_buf = None if in_place else np.empty(step, dtype=acc_dtype)
    for start in range(0, size, step):
        stop = min(start + step, size)
        acc = out_flat[start:stop] if in_place else acc_buf[: stop - start]
        for j, (flat, (_, wi)) in enumerate(zip(flats, active)):
            _kernel.accumulate(acc, flat[start:stop], wi, scratch[: stop - start], first=j == 0)
        _kernel.finalize(acc, acc if in_place else out_flat[start:stop], divisor)
    return out


def _average_leaf_xp(
    xp: Any,
    column: list[Any],
    w: np.ndarray,
    at: Callable[[int], str],
    int_policy: str,
    accumulate_dtype: Any,
) -> Any:
    """The same average in the leaf's own array library (torch, JAX, CuPy)."""
    xs = [detach(x) for x in column]
    for i, x in enumerate(xs):
        if namespace(x) is not xp:
            raise DtypeError(
                f"{at(i)}: a {type(column[i]).__name__} where params_list[{len(xs) - 1}] has "
                f"a {type(column[-1]).__name__}; every snapshot's leaf must come from the same "
                "array library"
            )

    def kind_of(dtype: Any) -> str:
        if xp.isdtype(dtype, "real floating"):
            return "float"
        if xp.isdtype(dtype, "complex floating"):
            return "complex"
        if xp.isdtype(dtype, ("integral", "bool")):
            return "int"
        return "other"

    kind = _check_leaves(xs, [tuple(x.shape) for x in xs], at, kind_of)
    if kind == "int":
        if int_policy in ("last", "first"):
            chosen = xs[-1] if int_policy == "last" else xs[0]
            return xp.asarray(chosen, copy=True)
        if int_policy == "error":
            _kernel.combine_ints([np.zeros(0)], w, "error", at(len(xs) - 1))
        wide = widest_float(xp)
        acc = sum(float(wi) * xp.astype(x, wide) for x, wi in zip(xs, w) if wi != 0)
        rounded = xp.round(xp.asarray(acc))
        if xs[-1].dtype == xp.bool:
            return rounded != 0
        return xp.astype(rounded, xs[-1].dtype)

    out_dtype = xp.result_type(*[x.dtype for x in xs])
    wide = out_dtype == xp.float64 or (
        accumulate_dtype is not None and np.dtype(accumulate_dtype) == np.float64
    )
    if kind == "complex":
        acc_dtype = out_dtype if not wide else xp.complex128
    else:
        acc_dtype = xp.float64 if wide else xp.float32
    acc = None
    for x, wi in zip(xs, w):
        if wi == 0:
            continue
        term = xp.astype(x, acc_dtype) * float(wi)
        acc = term if acc is None else acc + term
    if acc is None:
        return xp.zeros_like(xs[-1])
    return xp.astype(acc, out_dtype)
