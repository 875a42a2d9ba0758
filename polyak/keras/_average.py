"""Averaging Keras models in memory, and saved model files one at a time."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import keras
import numpy as np

from polyak import _kernel
from polyak._accumulate import WeightedSum, inputs_to_read
from polyak._average import average, weights
from polyak._types import PathLike, ScheduleLike
from polyak.keras import _files
from polyak.keras._layout import check_all, check_layout, empty_copy, layout, nonempty
from polyak.utils import order_inputs

__all__ = ["average_weights", "average_models", "average_files"]


def average_weights(
    models: Sequence[keras.Model], schedule: ScheduleLike = None, *, accumulate_dtype: Any = None
) -> list[np.ndarray]:
    """Average the weights of models of one architecture, as numpy arrays.

    All variables are averaged, the non-trainable ones (BatchNormalization moving statistics)
    included, with :func:`polyak.average` (float weights accumulate in float32 or float64 and
    are rounded once; integer variables are taken from the newest model).

    Args:
        models: Keras models of the same architecture, oldest first.
        schedule: Anything :func:`polyak.schedules.resolve` takes (``None`` or ``"equal"``
            for the plain mean, ``"linear"``, ``polyak.schedules.exponential(2.0)``, a list of
            weights...).
        accumulate_dtype: Raise the accumulation precision (``"float64"``), as in
            :func:`polyak.average`.

    Returns:
        The averaged weights, in ``model.get_weights()`` order, ready for ``set_weights``.

    Raises:
        EmptyInputError: ``models`` is empty.
        StructureError: the models' layers or variables differ (the message names the layer
            and the model index); ``ShapeError`` / ``DtypeError`` for a variable's shape or
            dtype.
        ScheduleError, WeightsError: a bad schedule.
        DtypeError: ``accumulate_dtype`` is not a floating-point dtype.

    Example:
        >>> weights = polyak.keras.average_weights([model_a, model_b])  # doctest: +SKIP
        >>> model_a.set_weights(weights)  # doctest: +SKIP
    """
    models = nonempty(models, "models")
    check_all(models, "models")
    snapshots = [model.get_weights() for model in models]
    return list(average(snapshots, schedule, accumulate_dtype=accumulate_dtype))


def average_models(
    models: Sequence[keras.Model], schedule: ScheduleLike = None, *, accumulate_dtype: Any = None
) -> keras.Model:
    """A new model holding the average of ``models``' weights.

    The new model is ``keras.models.clone_model(models[0])``, compiled with the first model's
    compile config (a fresh optimizer) when the first model is compiled. The inputs are left
    unchanged.

    Args:
        models: Keras models of the same architecture, oldest first.
        schedule: As for :func:`average_weights`.
        accumulate_dtype: As for :func:`average_weights`.

    Returns:
        The averaged model.

    Raises:
        As :func:`average_weights`; ``PolyakError`` if the first model cannot be cloned built.

    Example:
        >>> soup = polyak.keras.average_models(members[-5:], "linear")  # doctest: +SKIP
        >>> soup.evaluate(x_test, y_test)  # doctest: +SKIP
    """
    models = nonempty(models, "models")
    averaged = average_weights(models, schedule, accumulate_dtype=accumulate_dtype)
    clone = empty_copy(models[0], "models[0]")
    clone.set_weights(averaged)
    return clone


class _FileSum:
    """``sum_i w_i * x_i`` over models' variables fed one model at a time, one variable at a
    time: a :class:`WeightedSum` per float variable, the newest array per int/bool one.

    Per element this is :func:`polyak.average`'s computation in the same order (the weights
    split into coefficients and one divisor by the kernel, weight-0 snapshots never read,
    one division at the end), hence equal bit for bit. One scratch buffer per accumulator
    dtype, of the largest variable's size, serves every variable, so no numpy copy of a
    whole model is held besides the sums.
    """

    def __init__(self, divisor: float, accumulate_dtype: Any) -> None:
        self.divisor = divisor
        self.accumulate_dtype = accumulate_dtype
        self.sums: list[WeightedSum | None] = []
        self.newest: list[np.ndarray | None] = []
        self.dtypes: list[np.dtype] = []
        self.pool: dict[np.dtype, np.ndarray] = {}

    def add(self, variables: Sequence[Any], w: float, *, ints: bool) -> None:
        """Add ``w *`` each variable (read only when ``w != 0``); keep int ones if ``ints``."""
        for j, v in enumerate(variables):
            if j == len(self.sums):
                self._allocate(v, variables)
            total = self.sums[j]
            if total is None:
                if ints:
                    self.newest[j] = np.array(v.numpy(), copy=True)
            elif w != 0:
                total.add(np.asarray(v.numpy()), w)

    def _allocate(self, v: Any, variables: Sequence[Any]) -> None:
        dtype = np.dtype(v.dtype)
        self.dtypes.append(dtype)
        self.newest.append(None)
        acc_dtype = self._acc_dtype(dtype)
        if acc_dtype is None:
            self.sums.append(None)
            return
        if acc_dtype not in self.pool:  # sized from the variables' shapes: nothing is read
            largest = max(
                math.prod(u.shape) for u in variables if self._acc_dtype(u.dtype) == acc_dtype
            )
            self.pool[acc_dtype] = np.empty(largest, acc_dtype)
        scratch = self.pool[acc_dtype][: math.prod(v.shape)].reshape(tuple(v.shape))
        self.sums.append(WeightedSum(scratch=scratch, accumulate_dtype=self.accumulate_dtype))

    def _acc_dtype(self, dtype: Any) -> np.dtype | None:
        dtype = np.dtype(dtype)
        if _kernel.dtype_kind(dtype) not in ("float", "complex"):
            return None
        return _kernel.accumulator_dtype(dtype, self.accumulate_dtype)

    def result(self) -> list[np.ndarray]:
        self.pool.clear()
        out = []
        for total, newest, dtype in zip(self.sums, self.newest, self.dtypes):
            # float32/float64 variables are divided in place, as polyak.average does.
            out.append(newest if total is None else total.result(dtype, divisor=self.divisor))
        return out


def average_files(
    paths: Sequence[PathLike],
    schedule: ScheduleLike = None,
    *,
    model: keras.Model | None = None,
    accumulate_dtype: Any = None,
    sort: Literal["natural"] | None = None,
) -> keras.Model:
    """Average saved Keras models, loading one file at a time.

    Memory holds the running weighted sum and one model, never all the snapshots: each file is
    loaded, added to the sum and released before the next one is read. Files the schedule
    gives weight 0 (``tail``, ``swa``) are not read, except the newest. The arithmetic is the
    core kernel's, so the result equals :func:`polyak.average` of the files' weights bit for
    bit (integer variables come from the newest file, its default ``int_policy="last"``).

    Args:
        paths: ``.keras`` or ``.h5`` model files, or ``.weights.h5`` weight files, oldest
            first.
        schedule: As for :func:`average_weights` (weights for ``len(paths)`` snapshots).
        model: A built model of the files' architecture. Needed for ``.weights.h5`` files;
            when given, every file is loaded into a clone of it with ``load_weights`` (cheaper
            than rebuilding each model). ``model`` itself is left unchanged.
        accumulate_dtype: As for :func:`average_weights`; checked before any file is read.
        sort: ``None`` keeps the order given (with a :class:`polyak.OrderWarning` when
            numbered names are out of natural order, as ``sorted(glob(...))`` puts
            ``epoch_10`` before ``epoch_9``); ``"natural"`` orders them by their numbers.

    Returns:
        A model holding the averaged weights: the clone of ``model``, or else the model of the
        newest file, compiled from that file's compile config with a fresh optimizer.

    Raises:
        EmptyInputError: ``paths`` is empty.
        PolyakError: ``sort`` is neither None nor ``"natural"``.
        ModelFileError: a file is missing, of another kind, or cannot be loaded (the message
            names ``paths[i]``), or a ``.weights.h5`` file is given without ``model``.
        StructureError, ShapeError, DtypeError: a file's architecture differs from the first
            one's (the message names the layer and ``paths[i]``).

    Example:
        >>> paths = glob.glob("checkpoints/epoch_*.keras")  # doctest: +SKIP
        >>> model = polyak.keras.average_files(  # doctest: +SKIP
        ...     paths, "exponential", sort="natural"
        ... )
    """
    paths = [os.fspath(p) for p in order_inputs(nonempty(paths, "paths"), sort)]
    _files.check_files(paths, model is not None)
    _kernel.accumulator_dtype(np.float32, accumulate_dtype)  # checked before any read
    coefficients, divisor = _kernel.split_weights(weights(schedule, len(paths)))
    # As in polyak.average: weight-0 files are never read, except the newest for its ints.
    plan = inputs_to_read([coefficients], "last")
    total = _FileSum(divisor, accumulate_dtype)
    ref = None if model is None else layout(model, "model")
    holder = None if model is None else empty_copy(model, "model")
    ref_label = "model"
    current = None
    for i in plan.any:
        label = f"paths[{i}] {paths[i]!r}"
        if holder is None and current is not None:
            # Release the previous model before reading the next one.
            del current
            _files.release()
        current = _files.load(paths[i], holder, label, compile=i == len(paths) - 1)
        mine = layout(current, label)
        if ref is None:
            ref, ref_label = mine, label
        else:
            check_layout(mine, label, ref, ref_label)
        total.add(current.weights, float(coefficients[i]), ints=i in plan.ints)
    current.set_weights(total.result())
    if current.compiled:
        # Loading restored the newest snapshot's optimizer state; it does not belong to the
        # average.
        current.compile_from_config(current.get_compile_config())
    return current
