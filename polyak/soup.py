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

from polyak import _backend, _kernel, _tree
from polyak._accumulate import WeightedSum
from polyak._deprecation import renamed
from polyak._errors import DtypeError, EmptyInputError, PolyakError, ShapeError
from polyak._types import IntPolicy, PathLike

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


@renamed(candidates="snapshots")
def greedy(
    snapshots: Sequence[Any | PathLike],
    evaluate: Callable[[Any], float],
    *,
    load: Callable[[Any], Any] | None = None,
    higher_is_better: bool = True,
    int_policy: IntPolicy = "first",
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
            candidates for the soup. (Formerly ``candidates``, deprecated.)
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
    soup = _Soup(ref, accumulate_dtype, int_policy)
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
    soup: _Soup,
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
        self.backends = [_backend.get(leaf) for leaf in leaves]
        self.kinds = [be.kind(leaf.dtype) for be, leaf in zip(self.backends, leaves)]
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]

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
            if other.backends[j] is not self.backends[j]:
                raise DtypeError(
                    f"{other.at(j)}: a {type(other.leaves[j]).__name__} leaf where {self.root} "
                    "has another array library's; every snapshot's leaf must come from the "
                    "same library"
                )


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
    leaves, accessors, treespec = _tree.flatten(tree, root)
    leaves = [_backend.get(x).as_array(x) for x in leaves]
    layout = _Layout(leaves, accessors, treespec, root)
    for j, k in enumerate(layout.kinds):
        if k == "other":
            raise DtypeError(f"{layout.at(j)}: dtype {leaves[j].dtype} cannot be averaged")
    return layout


class _Soup:
    """The soup as one :class:`WeightedSum` of its members per float leaf, plus the integer
    leaves the int policy needs; divided by the member count only when asked for params."""

    def __init__(self, ref: _Layout, accumulate_dtype: Any, int_policy: str):
        self.ref = ref
        self.int_policy = int_policy
        self.count = 0
        self.sums = [
            None if kind == "int" else WeightedSum(accumulate_dtype=accumulate_dtype)
            for kind in ref.kinds
        ]
        self.ints: list[list[Any]] = [[] for _ in ref.kinds]

    def with_added(self, layout: _Layout) -> _Soup:
        new = object.__new__(_Soup)
        new.ref, new.int_policy, new.count = self.ref, self.int_policy, self.count
        new.sums = [None if s is None else s.copy() for s in self.sums]
        new.ints = [list(v) for v in self.ints]
        new.add(layout)
        return new

    def add(self, layout: _Layout) -> None:
        for j, x in enumerate(layout.leaves):
            total = self.sums[j]
            if total is not None:
                total.add(x, 1.0)
                continue
            # Only "average" needs every member's integers; the other policies need the
            # first and the newest, so the soup never holds more than two copies.
            if self.int_policy != "average" and len(self.ints[j]) == 2:
                self.ints[j].pop()
            self.ints[j].append(x)
        self.count += 1

    def params(self) -> Any:
        leaves = []
        for j, total in enumerate(self.sums):
            if total is None:
                ints = self.ints[j]
                where = _tree.where(self.ref.accessors[j], root="the soup")
                weights = np.full(len(ints), 1.0 / len(ints))
                leaves.append(
                    self.ref.backends[j].combine_ints(ints, weights, self.int_policy, where)
                )
            else:
                # Sum of 1 * x_i, one division, one rounding: what polyak.average does with
                # equal weights (kernel.split_weights), so the soup equals it bit for bit.
                # On a copy: the sum keeps growing as members join.
                leaves.append(total.copy().result(self.ref.dtypes[j], divisor=float(self.count)))
        return self.ref.treespec.unflatten(leaves)
