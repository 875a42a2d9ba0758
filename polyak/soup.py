"""Greedy model soups: average the fine-tuned models that help, leave out the ones that hurt.

References:
    Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon,
    Kornblith, Schmidt, `Model soups: averaging weights of multiple fine-tuned models improves
    accuracy without increasing inference time <https://arxiv.org/abs/2203.05482>`_,
    ICML 2022 (recipe 1, "greedy soup").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from polyak import _kernel, _tree
from polyak._arrays import detach, namespace, widest_float
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError

__all__ = ["SoupResult", "greedy"]


class SoupResult(NamedTuple):
    """What :func:`greedy` found.

    Attributes:
        params: The soup: the uniform average of the chosen snapshots, as a pytree shaped
            like the snapshots, each leaf of its snapshots' dtype and array library.
        members: Indices (into ``snapshots``) of the chosen snapshots, in the order they
            joined; the first is the best single snapshot.
        scores: The soup's score after each step: ``scores[0]`` is the best single
            snapshot's, then one entry per further snapshot tried (best first), so
            ``len(scores) == len(snapshots)`` and the last entry is the final soup's score.
        individual_scores: Each snapshot's own score, in the order of ``snapshots``.
    """

    params: Any
    members: list[int]
    scores: list[float]
    individual_scores: list[float]


def greedy(
    snapshots: Sequence[Any],
    evaluate: Callable[[Any], float],
    *,
    load: Callable[[Any], Any] | None = None,
    higher_is_better: bool = True,
    int_policy: str = "first",
    accumulate_dtype: Any = None,
    name: str = "snapshots",
) -> SoupResult:
    """Greedy soup: add snapshots best first, keeping each one only if the soup improves.

    Every snapshot is scored on its own; then, starting from the best one, each next
    snapshot (in order of its own score) joins the soup if the uniform average of the soup
    with it scores at least as well as the soup without it. A diverged or otherwise harmful
    snapshot therefore stays out, and the soup scores at least as well as the best single
    snapshot on the held-out metric that ``evaluate`` computes.

    Snapshots may be pytrees of arrays or paths of ``.safetensors`` checkpoints (mixed
    freely), or anything a ``load`` function turns into a pytree. Memory stays bounded: the
    soup is held as one running sum (in the accumulator dtype of :func:`polyak.average`),
    and checkpoints are loaded one at a time, each twice (once to score it alone, once to
    try it in the soup). ``evaluate`` is called ``2 * len(snapshots) - 1`` times.

    Args:
        snapshots: Pytrees with one structure, shapes and dtypes, or checkpoint paths: the
            candidates for the soup.
        evaluate: The held-out metric, ``evaluate(params) -> float``. It receives a
            snapshot as ``load`` returns it (by default a pytree as given, and a path as
            ``polyak.safetensors.load`` reads it: a flat dict of numpy arrays) or a trial
            soup, a pytree like the snapshots (torch/JAX leaves stay torch/JAX). A NaN score
            counts as the worst possible.
        load: The loader seam: ``load(snapshots[i]) -> pytree``, called twice per snapshot,
            one snapshot at a time, so that a framework adapter can read its own models or
            files (``polyak.keras.greedy_soup`` does). By default, a path is read with
            :func:`polyak.safetensors.load` and a pytree is used as given.
        higher_is_better: ``False`` for a loss, ``True`` (the default) for an accuracy.
        int_policy: What to do with integer and bool leaves, which are not averaged by
            default; as in :func:`polyak.average`, except that the default is ``"first"``:
            the soup's first member, the best single snapshot, is the model the soup is
            built on, so its step counters and masks are kept, whichever snapshots join
            later (``"last"`` would take the last one to join).
        accumulate_dtype: Accumulator dtype for floating leaves (default: float32 for
            16/32-bit floats, float64 for float64), as in :func:`polyak.average`.
        name: What error messages call the sequence (``snapshots[3]``); an adapter passes
            the name of its own argument.

    Returns:
        A :class:`SoupResult` with the soup's ``params``, ``members`` and ``scores``.

    Raises:
        EmptyInputError: ``snapshots`` is empty.
        StructureError, ShapeError, DtypeError: a snapshot does not match the first one
            (the message names which snapshot and which leaf).
        PolyakError: ``evaluate`` returned something that is not a real number.

    Example:
        >>> import numpy as np
        >>> snaps = [{"w": np.array([1.0])}, {"w": np.array([3.0])}, {"w": np.array([99.0])}]
        >>> result = greedy(snaps, lambda p: 10.0 - abs(float(p["w"][0]) - 2.0))
        >>> result.members, result.params["w"], result.scores
        ([0, 1], array([2.]), [9.0, 10.0, 10.0])
    """
    if isinstance(snapshots, (str, os.PathLike)):
        raise PolyakError(
            f"{name} must be a list of pytrees or paths, got the single path {snapshots!r}"
        )
    items = list(snapshots)
    if not items:
        raise EmptyInputError(f"{name} is empty: give at least one pytree or checkpoint path")
    _kernel.check_int_policy(int_policy)
    # Checked now, not when the soup is first summed: by then every snapshot has been
    # evaluated, and torch/JAX leaves would not check it at all.
    _kernel.accumulator_dtype(np.float32, accumulate_dtype)

    def load_at(i: int) -> tuple[Any, _Layout]:
        if load is None:
            return _read(items[i], f"{name}[{i}]")
        tree = load(items[i])
        return tree, _layout(tree, f"{name}[{i}]")

    ref, individual = _score_each(len(items), load_at, evaluate, int_policy, name)
    # Stable sort, best first, NaN last: ties keep the snapshots' order.
    order = sorted(range(len(items)), key=lambda i: _sort_key(individual[i], higher_is_better))
    soup = _RunningSum(ref, accumulate_dtype, int_policy)
    params, members, scores = _search(
        soup, order, individual, load_at, evaluate, higher_is_better, name
    )
    return SoupResult(params, members, scores, individual)


def _score_each(
    count: int,
    load_at: Callable[[int], tuple[Any, _Layout]],
    evaluate: Callable[[Any], float],
    int_policy: str,
    name: str,
) -> tuple[_Layout, list[float]]:
    """Pass 1: score each snapshot alone, checking that all of them match the first."""
    ref: _Layout | None = None
    individual: list[float] = []
    for i in range(count):
        tree, layout = load_at(i)
        if ref is None:
            ref = layout.skeleton()
            if int_policy == "error" and "int" in layout.kinds:
                j = layout.kinds.index("int")
                raise DtypeError(
                    f"{layout.at(j)}: {layout.dtypes[j]} leaf cannot be averaged with "
                    "int_policy='error' (use 'first', 'last' or 'average')"
                )
        else:
            ref.check(layout)
        individual.append(_score(evaluate(tree), f"evaluate({name}[{i}])"))
        del tree, layout
    assert ref is not None  # count >= 1, checked by the caller
    return ref, individual


def _search(
    soup: _RunningSum,
    order: list[int],
    individual: list[float],
    load_at: Callable[[int], tuple[Any, _Layout]],
    evaluate: Callable[[Any], float],
    higher_is_better: bool,
    name: str,
) -> tuple[Any, list[int], list[float]]:
    """Pass 2: the greedy loop over a running sum, best single snapshot first."""
    better = _comparator(higher_is_better)
    first = order[0]
    soup.add(load_at(first)[1])
    members = [first]
    scores = [individual[first]]
    for i in order[1:]:
        layout = load_at(i)[1]
        trial = soup.with_added(layout)
        score = _score(evaluate(trial.params()), f"evaluate(soup + {name}[{i}])")
        if better(score, scores[-1]):
            soup = trial
            members.append(i)
            scores.append(score)
        else:
            scores.append(scores[-1])
        del layout, trial
    return soup.params(), members, scores


# --- helpers -----------------------------------------------------------------------------


def _comparator(higher_is_better: bool) -> Callable[[float, float], bool]:
    # "At least as well" (>=), as in the paper. A NaN score never joins a real-scored soup.
    if higher_is_better:
        return lambda new, old: new >= old or (math.isnan(old) and not math.isnan(new))
    return lambda new, old: new <= old or (math.isnan(old) and not math.isnan(new))


def _sort_key(score: float, higher_is_better: bool) -> tuple[bool, float]:
    if math.isnan(score):
        return (True, 0.0)
    return (False, -score if higher_is_better else score)


def _score(value: object, what: str) -> float:
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PolyakError(f"{what} must return a real number, got {value!r}") from None
    return score


class _Layout:
    """One snapshot's leaves (detached, in their own library), with its accessors and spec.

    :meth:`skeleton` keeps everything but the arrays, so that the reference layout used for
    checks does not pin the first snapshot in memory.
    """

    def __init__(self, leaves: list[Any], accessors: list[Any], treespec: Any, root: str):
        self.leaves = leaves
        self.accessors = accessors
        self.treespec = treespec
        self.root = root
        self.kinds = [_kind(leaf) for leaf in leaves]
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.namespaces = [namespace(leaf) for leaf in leaves]

    def skeleton(self) -> _Layout:
        bare = object.__new__(_Layout)
        bare.__dict__.update(self.__dict__)
        bare.leaves = []
        return bare

    def at(self, j: int) -> str:
        return _tree.where(self.accessors[j], root=self.root)

    def check(self, other: _Layout) -> None:
        """Raise if ``other`` cannot be averaged with this (the reference) snapshot."""
        _tree.check_same_structure(
            other.treespec, other.accessors, self.treespec, self.accessors, other.root, self.root
        )
        for j in range(len(self.kinds)):
            if other.shapes[j] != self.shapes[j]:
                raise ShapeError(
                    f"{other.at(j)}: shape {other.shapes[j]} != {self.shapes[j]} in {self.root}"
                )
            if other.kinds[j] != self.kinds[j]:
                raise DtypeError(
                    f"{other.at(j)}: dtype {other.dtypes[j]} ({other.kinds[j]}) != "
                    f"{self.dtypes[j]} ({self.kinds[j]}) in {self.root}"
                )
            if other.namespaces[j] is not self.namespaces[j]:
                raise DtypeError(
                    f"{other.at(j)}: a {type(other.leaves[j]).__name__} leaf where {self.root} "
                    "has another array library's; every snapshot's leaf must come from the "
                    "same library"
                )


def _kind(leaf: Any) -> str:
    xp = namespace(leaf)
    if xp is None:
        return _kernel.dtype_kind(leaf.dtype)
    # The kernel's kinds: a complex leaf is "complex", so it never pairs with a real one.
    if xp.isdtype(leaf.dtype, "real floating"):
        return "float"
    if xp.isdtype(leaf.dtype, "complex floating"):
        return "complex"
    if xp.isdtype(leaf.dtype, ("integral", "bool")):
        return "int"
    return "other"


def _read(snapshot: Any, root: str) -> tuple[Any, _Layout]:
    """The default loader: a checkpoint path is read with the safetensors adapter."""
    if isinstance(snapshot, (str, os.PathLike)):
        # Imported here: the safetensors adapter is only needed for checkpoint paths.
        from polyak import safetensors as _st

        root = f"{root} ({os.fspath(snapshot)})"
        try:
            snapshot = _st.load(snapshot)
        except PolyakError as err:
            raise type(err)(f"{root}: {err}") from None
    return snapshot, _layout(snapshot, root)


def _layout(tree: Any, root: str) -> _Layout:
    """Flatten ``tree`` (named ``root`` in messages) into a :class:`_Layout`."""
    leaves, accessors, treespec = _tree.flatten(tree)
    leaves = [detach(x) if namespace(x) is not None else np.asarray(x) for x in leaves]
    layout = _Layout(leaves, accessors, treespec, root)
    for j, k in enumerate(layout.kinds):
        if k == "other":
            raise DtypeError(f"{layout.at(j)}: dtype {leaves[j].dtype} cannot be averaged")
    return layout


class _RunningSum:
    """The soup as the sum of its members' float leaves, plus the integer leaves it needs.

    numpy leaves are summed by the core kernel; torch/JAX leaves in their own library (so
    bfloat16 and GPU tensors stay as they are), in float32, or float64 for float64 leaves.
    """

    def __init__(self, ref: _Layout, accumulate_dtype: Any, int_policy: str):
        self.ref = ref
        self.accumulate_dtype = accumulate_dtype
        self.int_policy = int_policy
        self.count = 0
        self.sums: list[Any] = [None] * len(ref.kinds)
        self.ints: list[list[Any]] = [[] for _ in ref.kinds]

    def with_added(self, layout: _Layout) -> _RunningSum:
        new = _RunningSum(self.ref, self.accumulate_dtype, self.int_policy)
        new.count = self.count
        new.sums = [s.copy() if isinstance(s, np.ndarray) else s for s in self.sums]
        new.ints = [list(v) for v in self.ints]
        new.add(layout)
        return new

    def add(self, layout: _Layout) -> None:
        for j, x in enumerate(layout.leaves):
            if layout.kinds[j] == "int":
                # Only "average" needs every member's integers; the other policies need the
                # first and the newest, so the soup never holds more than two copies.
                if self.int_policy != "average" and len(self.ints[j]) == 2:
                    self.ints[j].pop()
                self.ints[j].append(x)
                continue
            xp = namespace(x)
            if xp is not None:
                term = xp.astype(x, self._xp_acc_dtype(xp, x.dtype))
                # Functional add (not +=): a trial soup may share arrays with its parent.
                self.sums[j] = term if self.sums[j] is None else self.sums[j] + term
            elif self.sums[j] is None:
                acc_dtype = _kernel.accumulator_dtype(x.dtype, self.accumulate_dtype)
                self.sums[j] = np.empty(x.shape, dtype=acc_dtype)
                _kernel.accumulate(self.sums[j], x, 1.0, self.sums[j], first=True)
            else:
                scratch = np.empty_like(self.sums[j])
                _kernel.accumulate(self.sums[j], x, 1.0, scratch, first=False)
        self.count += 1

    def _xp_acc_dtype(self, xp: Any, dtype: Any) -> Any:
        wide = dtype == xp.float64 or (
            self.accumulate_dtype is not None and np.dtype(self.accumulate_dtype) == np.float64
        )
        if xp.isdtype(dtype, "complex floating"):
            return xp.complex128 if wide else xp.result_type(dtype, xp.complex64)
        return widest_float(xp) if wide else xp.float32

    def params(self) -> Any:
        leaves = []
        for j, kind in enumerate(self.ref.kinds):
            if kind == "int":
                leaves.append(self._ints(j))
                continue
            xp = self.ref.namespaces[j]
            if xp is not None:
                leaves.append(xp.astype(self.sums[j] / self.count, self.ref.dtypes[j]))
            else:
                # Sum of 1 * x_i, one division, one rounding: what polyak.average does with
                # equal weights (kernel.split_weights), so the soup equals it bit for bit.
                out = np.empty(self.ref.shapes[j], dtype=self.ref.dtypes[j])
                _kernel.finalize(self.sums[j].copy(), out, float(self.count))
                leaves.append(out)
        return self.ref.treespec.unflatten(leaves)

    def _ints(self, j: int) -> Any:
        ints = self.ints[j]
        xp = namespace(ints[0])
        if xp is None:
            weights = np.full(len(ints), 1.0 / len(ints))
            where = _tree.where(self.ref.accessors[j], root="the soup")
            return _kernel.combine_ints(ints, weights, self.int_policy, where)
        if self.int_policy == "first":
            return xp.asarray(ints[0], copy=True)
        if self.int_policy == "last":
            return xp.asarray(ints[-1], copy=True)
        if self.int_policy == "error":
            raise DtypeError(
                f"{_tree.where(self.ref.accessors[j], root='the soup')}: {ints[0].dtype} leaf "
                "cannot be averaged with int_policy='error' (use 'last', 'first' or 'average')"
            )
        mean = sum(xp.astype(x, widest_float(xp)) for x in ints) / len(ints)
        rounded = xp.round(mean)
        if ints[0].dtype == xp.bool:
            return rounded != 0
        return _clip_cast(xp, rounded, ints[0].dtype)


def _clip_cast(xp: Any, rounded: Any, dtype: Any) -> Any:
    """Cast rounded floats to an integer dtype, clipped to its range as the numpy path does.

    The mean of in-range integers can still round past the range in float: int64's maximum
    is 2**63 in float64, which torch's cast wraps to the minimum. Saturate by comparing in
    float, then choosing the bound, so no out-of-range float is ever trusted to the cast.
    """
    info = xp.iinfo(dtype)
    out = xp.astype(rounded, dtype)
    out = xp.where(rounded >= float(info.max), xp.asarray(info.max, dtype=dtype), out)
    return xp.where(rounded <= float(info.min), xp.asarray(info.min, dtype=dtype), out)
