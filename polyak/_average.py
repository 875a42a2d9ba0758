"""``polyak.average`` and ``polyak.weights``: the offline weighted average of pytrees."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from polyak import _backend, _kernel, _tree
from polyak._accumulate import ReadPlan, WeightedSum, inputs_to_read
from polyak._deprecation import renamed
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError
from polyak._types import IntPolicy, ScheduleLike
from polyak.schedules import resolve

__all__ = ["average", "average_named", "weights", "ScheduleLike"]

Tree = TypeVar("Tree")
_ROOT = "snapshots"


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


@renamed(params_list="snapshots")
def average(
    snapshots: Sequence[Tree],
    schedule: ScheduleLike = None,
    *,
    normalize: bool = True,
    int_policy: IntPolicy = "last",
    accumulate_dtype: np.dtype | str | None = None,
) -> Tree:
    """The weighted average of parameter pytrees, oldest first.

    Each float leaf is accumulated as ``sum_i w_i * x_i`` in float32 (float16, bfloat16,
    float8 and float32 leaves) or float64 (float64 leaves), chunk by chunk so that the
    snapshots are never stacked, and rounded once to the leaves' dtype. Leaves may be numpy
    arrays, Python numbers, or arrays of any array-API library (torch tensors, JAX arrays),
    which are computed in their own library and stay on their device.

    Args:
        snapshots: a non-empty sequence of pytrees with identical structure (nested
            dict / OrderedDict / list / tuple / namedtuple; Keras ``get_weights()`` lists,
            torch ``state_dict()`` dicts, JAX/Flax params), index 0 the OLDEST snapshot.
            Its former name ``params_list`` still works for one release, with a
            ``DeprecationWarning``.
        schedule: ``None``/``"equal"``, a name such as ``"linear"`` or ``"exponential"``, a
            :class:`polyak.Schedule`, explicit weights (oldest first) or a callable
            ``n -> weights``.
        normalize: divide by the sum of the weights. ``False`` uses them as given (task
            arithmetic, post-hoc EMA coefficients, negative weights).
        int_policy: what to do with integer and bool leaves (step counters, BatchNorm
            ``num_batches_tracked``): ``"last"`` takes the newest, ``"first"`` the oldest,
            ``"average"`` averages, rounds half to even and clips to the dtype's range,
            ``"error"`` refuses.
        accumulate_dtype: raise the accumulation precision, e.g. ``"float64"``.

    Returns:
        A pytree of the same structure; each float leaf has the dtype of the inputs and the
        type of the newest snapshot's leaf.

    Raises:
        EmptyInputError: ``snapshots`` is empty.
        StructureError: a snapshot's structure differs from ``snapshots[0]``.
        ShapeError: a leaf's shape differs, e.g.
            ``snapshots[3]['dense']['kernel']: shape (25, 4) != (25, 3)``.
        DtypeError: a leaf's dtype kind differs, or cannot be averaged, or
            ``accumulate_dtype`` is not a float or complex dtype.
        WeightsError: weights that are NaN/inf, of the wrong count, or sum to <= 0.

    Example:
        >>> import numpy as np, polyak
        >>> snaps = [{"w": np.array([0.0, 2.0])}, {"w": np.array([2.0, 4.0])}]
        >>> polyak.average(snaps)
        {'w': array([1., 3.])}
        >>> polyak.average(snaps, "linear")["w"].round(3)
        array([1.333, 3.333])
    """
    return average_named(
        snapshots, None, schedule,
        normalize=normalize, int_policy=int_policy, accumulate_dtype=accumulate_dtype,
    )  # fmt: skip


def average_named(
    snapshots: Sequence[Tree],
    names: Sequence[str] | None,
    schedule: ScheduleLike = None,
    *,
    normalize: bool = True,
    int_policy: IntPolicy = "last",
    accumulate_dtype: np.dtype | str | None = None,
) -> Tree:
    """:func:`average`, with error messages calling snapshot ``i`` ``names[i]`` (its file,
    when the snapshots were loaded from files) instead of ``snapshots[i]``."""
    snaps = _as_list(snapshots)
    if names is not None and len(names) != len(snaps):
        raise PolyakError(f"{len(names)} names for {len(snaps)} snapshots")

    def root(i: int) -> str:
        return names[i] if names is not None else f"{_ROOT}[{i}]"

    _kernel.check_int_policy(int_policy)
    w = weights(schedule, len(snaps), normalize=normalize)
    # Checked once, up front: a leaf library that never reaches the float path (or a tree
    # of int leaves) must not let a bad value through.
    _kernel.accumulator_dtype(np.float32, accumulate_dtype)

    ref_leaves, ref_acc, ref_spec = _tree.flatten(snaps[0], root(0))
    columns: list[list[Any]] = [[leaf] for leaf in ref_leaves]
    for i, snap in enumerate(snaps[1:], start=1):
        leaves, acc, spec = _tree.flatten(snap, root(i))
        _tree.check_same_structure(spec, acc, ref_spec, ref_acc, root(i), root(0))
        for column, leaf in zip(columns, leaves):
            column.append(leaf)

    leaf_weights = _LeafWeights(w, int_policy, accumulate_dtype, root)
    out = [
        _average_leaf(column, leaf_weights, accessor) for column, accessor in zip(columns, ref_acc)
    ]
    return ref_spec.unflatten(out)


class _LeafWeights:
    """What every leaf's average needs from the call: the weights, split as the kernel
    sums them, which inputs are read, and the options."""

    def __init__(
        self, w: np.ndarray, int_policy: str, accumulate_dtype: Any, root: Callable[[int], str]
    ) -> None:
        self.w = w
        self.root = root  # what messages call snapshot i
        self.coefficients, self.divisor = _kernel.split_weights(w)
        self.plan: ReadPlan = inputs_to_read([w], int_policy)
        self.int_policy = int_policy
        self.accumulate_dtype = accumulate_dtype


def _as_list(snapshots: Any) -> list[Any]:
    if isinstance(snapshots, (Mapping, str, bytes)) or not isinstance(snapshots, Iterable):
        raise PolyakError(
            f"{_ROOT} must be a sequence of pytrees (oldest first), got "
            f"{type(snapshots).__name__}; to average one model's snapshots, pass a list"
        )
    snaps = list(snapshots)
    if not snaps:
        raise EmptyInputError(f"{_ROOT} is empty: nothing to average")
    return snaps


def _average_leaf(column: list[Any], lw: _LeafWeights, accessor: Any) -> Any:
    def at(i: int) -> str:
        return _tree.where(accessor, lw.root(i))

    be = _backend.get(column[-1])
    xs = _same_library(be, column, at, lw.root)
    kind = _check_leaves(be, xs, at, lw.root)
    last = len(xs) - 1
    if kind == "int":
        if lw.int_policy == "error":
            raise _kernel.int_policy_error(at(last), xs[-1].dtype)
        read = lw.plan.ints
        result = be.combine_ints([xs[i] for i in read], lw.w[read], lw.int_policy, at(last))
    else:
        try:
            out_dtype = be.result_type([x.dtype for x in xs])
        except TypeError:
            raise DtypeError(
                f"{at(last)}: dtypes {sorted({str(x.dtype) for x in xs})} have no common type"
            ) from None
        if isinstance(xs[-1], np.ndarray):
            result = _weighted_sum_numpy(xs, lw, out_dtype)
        else:
            total = WeightedSum(accumulate_dtype=lw.accumulate_dtype, dtype=out_dtype)
            for x, c in zip(xs, lw.coefficients):
                total.add(x, float(c))
            result = total.result(out_dtype, divisor=lw.divisor)
    newest = column[-1]
    if isinstance(newest, (bool, int, float, complex)) and not isinstance(newest, np.generic):
        return result.item()
    if isinstance(newest, np.generic):
        return result[()]
    return result


def _same_library(
    be: _backend.Backend,
    column: list[Any],
    at: Callable[[int], str],
    root: Callable[[int], str],
) -> list[Any]:
    """The column's leaves as arrays of ``be``'s library (the newest leaf's)."""
    numpy = isinstance(be, _backend.NumpyBackend)
    xs = []
    for i, leaf in enumerate(column):
        if _backend.get(leaf) is not be:
            if numpy:
                raise DtypeError(
                    f"{at(i)}: a {type(leaf).__name__} among numpy leaves; every snapshot's "
                    "leaf must come from the same array library"
                )
            raise DtypeError(
                f"{at(i)}: a {type(leaf).__name__} where {root(len(column) - 1)} has a "
                f"{type(column[-1]).__name__}; every snapshot's leaf must come from the same "
                "array library"
            )
        try:
            xs.append(be.as_array(leaf))
        except (TypeError, ValueError) as err:
            raise DtypeError(f"{at(i)}: cannot be read as an array: {err}") from None
    return xs


def _check_leaves(
    be: _backend.Backend, xs: list[Any], at: Callable[[int], str], root: Callable[[int], str]
) -> str:
    """Check shapes and dtype kinds against ``snapshots[0]``; return the kind."""
    kind = be.kind(xs[0].dtype)
    shape0 = tuple(xs[0].shape)
    for i, x in enumerate(xs):
        if tuple(x.shape) != shape0:
            raise ShapeError(f"{at(i)}: shape {tuple(x.shape)} != {shape0} in {root(0)}")
        k = be.kind(x.dtype)
        if k == "other":
            raise DtypeError(f"{at(i)}: dtype {x.dtype} cannot be averaged")
        if k != kind:
            raise DtypeError(
                f"{at(i)}: dtype {x.dtype} ({k}) != {xs[0].dtype} ({kind}) in {root(0)}"
            )
    return kind


def _weighted_sum_numpy(arrays: list[np.ndarray], lw: _LeafWeights, out_dtype: Any) -> np.ndarray:
    """The numpy sum, chunk by chunk through cache-sized buffers, so that a bf16 average
    never holds a full-size float32 accumulator."""
    acc_dtype = _kernel.accumulator_dtype(out_dtype, lw.accumulate_dtype)
    out = np.empty(arrays[0].shape, dtype=out_dtype)
    size = out.size
    active = [(a, float(c)) for a, c in zip(arrays, lw.coefficients) if c != 0]
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
        divisor = lw.divisor
        # As the streaming merge does (polyak._stream): a chunk whose integer-coefficient
        # sum is not finite (finite inputs near the dtype's maximum overflow x1 + x2) is
        # redone with the normalized weights, whose partial sums stay within the inputs.
        for attempt in (0, 1):
            total = WeightedSum(acc, scratch[: stop - start])
            with np.errstate(over="ignore", invalid="ignore"):
                for flat, (_, c) in zip(flats, active):
                    total.add(flat[start:stop], c if attempt == 0 else c / lw.divisor)
                if attempt == 1 or _kernel.all_finite(total.acc):
                    break
            divisor = 1.0
        total.result(out=acc if in_place else out_flat[start:stop], divisor=divisor)
    return out
