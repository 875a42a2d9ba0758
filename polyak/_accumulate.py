"""The one running weighted sum, and the one rule for which inputs must be read.

Every offline average in polyak (``polyak.average``, the streaming merge, ``SnapshotDir``,
``soup``, the Keras file average) is ``sum_i w_i * x_i`` over the snapshots with a nonzero
weight, rounded once. :class:`WeightedSum` is that sum for one leaf (or one chunk of one),
in the leaf's own library through :mod:`polyak._backend`; with numpy it is
:func:`polyak._kernel.accumulate` and :func:`polyak._kernel.finalize`, so every caller gets
the same bits. :func:`inputs_to_read` says which snapshots an average depends on at all:
weight-0 snapshots are never read, so ``tail(k)`` over a long run loads ``k`` of them and a
diverged (NaN) snapshot outside the window cannot poison the average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from polyak import _backend, _kernel

__all__ = ["ReadPlan", "inputs_to_read", "WeightedSum"]


class ReadPlan(NamedTuple):
    """Which inputs (indices, oldest first) an average reads.

    Attributes:
        floats: The inputs float/complex leaves are read from: those with a nonzero weight
            in at least one weight vector.
        ints: The inputs int/bool leaves are read from under the int policy: the newest for
            ``"last"``, the oldest for ``"first"``, those of ``floats`` for ``"average"``
            (the newest alone when there are none: it gives the dtype of the zero result),
            none for ``"error"`` (such a leaf is an error).
    """

    floats: list[int]
    ints: list[int]

    @property
    def any(self) -> list[int]:
        """Every input read for some leaf, in increasing order."""
        return sorted(set(self.floats) | set(self.ints))


def inputs_to_read(weight_vectors: Sequence[np.ndarray], int_policy: str) -> ReadPlan:
    """The inputs an average with these weights and this int policy depends on.

    Args:
        weight_vectors: One or more weight vectors of the same length ``n`` (one per output
            of a multi-output merge), oldest first.
        int_policy: ``"last"``, ``"first"``, ``"average"`` or ``"error"``.

    Returns:
        A :class:`ReadPlan`.

    Raises:
        PolyakError: an unknown ``int_policy``, or no weight vector.

    Example:
        >>> import numpy as np
        >>> inputs_to_read([np.array([0.0, 0.5, 0.5, 0.0])], "last")
        ReadPlan(floats=[1, 2], ints=[3])
    """
    _kernel.check_int_policy(int_policy)
    ws = [np.asarray(w) for w in weight_vectors]
    if not ws:
        raise _kernel.PolyakError("no weight vectors given")
    n = len(ws[0])
    floats = [i for i in range(n) if any(w[i] != 0 for w in ws)]
    if int_policy == "last":
        ints = [n - 1]
    elif int_policy == "first":
        ints = [0]
    elif int_policy == "average":
        ints = list(floats) or [n - 1]
    else:
        ints = []
    return ReadPlan(floats, ints)


class WeightedSum:
    """``sum_i w_i * x_i`` of one leaf, fed one snapshot at a time.

    The first nonzero-weight :meth:`add` scales ``x`` into the accumulator, later ones add to
    it; a weight of 0 reads nothing. The accumulator's dtype is the backend's rule
    (float32 for bf16/f16/fp8/float32, float64 for float64, at least complex64 for complex),
    raised by ``accumulate_dtype``. :meth:`result` divides once and rounds once.

    Args:
        acc: Optional numpy buffer to accumulate in, e.g. one chunk of a preallocated
            buffer: no memory is then allocated (the streaming merge). Its dtype is the
            accumulator's.
        scratch: Optional numpy buffer like ``acc`` for the weighted terms.
        accumulate_dtype: Raise the accumulation precision, e.g. ``"float64"``.
        dtype: The dtype of the leaves summed, when known for all of them (their common
            type); the accumulator's dtype follows from it. By default, from the first
            nonzero-weight leaf added.

    Example:
        >>> import numpy as np
        >>> s = WeightedSum()
        >>> s.add(np.array([1.0, 2.0], dtype=np.float32), 1.0)
        >>> s.add(np.array([3.0, 5.0], dtype=np.float32), 3.0)
        >>> s.result(np.float32, divisor=4.0)
        array([2.5 , 4.25], dtype=float32)
    """

    __slots__ = ("acc", "scratch", "accumulate_dtype", "dtype", "like", "_backend", "_started")

    def __init__(
        self,
        acc: Any = None,
        scratch: Any = None,
        *,
        accumulate_dtype: Any = None,
        dtype: Any = None,
    ) -> None:
        self.acc = acc
        self.dtype = dtype
        self.scratch = scratch
        self.accumulate_dtype = accumulate_dtype
        self.like: Any = None  # the last leaf seen: shape and library of an empty sum
        self._backend: _backend.Backend | None = None
        self._started = False

    @property
    def started(self) -> bool:
        """Whether a nonzero-weight snapshot has been added."""
        return self._started

    def add(self, x: Any, w: float) -> None:
        """Add ``w * x``; ``x`` is not read when ``w == 0``.

        Raises:
            DtypeError: ``x`` is not float/complex, or ``accumulate_dtype`` is not a float
                or complex dtype.
        """
        if w == 0:
            if not self._started:
                self.like = x  # kept only while empty: a sum must not pin its inputs
            return
        be = self._backend
        if be is None:
            be = self._backend = _backend.get(x)
        if not self._started:
            if self.acc is None:
                dtype = x.dtype if self.dtype is None else self.dtype
                self.acc = be.scaled(x, w, be.acc_dtype(dtype, self.accumulate_dtype))
            else:  # the caller's buffer
                be.weighted_add(self.acc, x, w, self.acc, first=True)
            self._started = True
            return
        if self.scratch is None and isinstance(self.acc, np.ndarray):
            self.scratch = np.empty_like(self.acc)
        self.acc = be.weighted_add(self.acc, x, w, self.scratch, first=False)

    def copy(self) -> WeightedSum:
        """An independent sum that later :meth:`add` calls on either leave the other alone."""
        new = WeightedSum(accumulate_dtype=self.accumulate_dtype, dtype=self.dtype)
        new.like, new._backend, new._started = self.like, self._backend, self._started
        if isinstance(self.acc, np.ndarray):
            new.acc = self.acc.copy()
        else:
            new.acc = self.acc  # other libraries add functionally: sharing is safe
        return new

    def result(self, dtype: Any = None, *, divisor: float = 1.0, out: Any = None) -> Any:
        """The sum divided by ``divisor``, rounded once to ``dtype`` (or into ``out``).

        With numpy, the accumulator itself is divided and, when it already has ``dtype``,
        returned: call :meth:`copy` first to keep adding. A sum of nothing is zeros.

        Args:
            dtype: The result's dtype (default: the accumulator's).
            divisor: See :func:`polyak._kernel.split_weights`.
            out: A numpy buffer to write the result into (then returned).
        """
        if not self._started:
            if out is not None:
                out[...] = 0
                return out
            be = _backend.get(self.like)
            like = be.as_array(self.like)
            return be.zeros(like, like.dtype if dtype is None else dtype)
        be = self._backend
        if isinstance(self.acc, np.ndarray):
            if out is None:
                out = self.acc if dtype is None or np.dtype(dtype) == self.acc.dtype else None
                if out is None:
                    out = np.empty(self.acc.shape, dtype=dtype)
            _kernel.finalize(self.acc, out, divisor)
            return out
        acc = be.divide(self.acc, divisor)
        return be.cast(acc, self.acc.dtype if dtype is None else dtype)
