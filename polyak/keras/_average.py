"""Averaging Keras models in memory, and saved model files one at a time."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np

from polyak import _kernel
from polyak._average import average, weights
from polyak.keras import _files
from polyak.keras._layout import check_all, check_layout, empty_copy, layout, nonempty

__all__ = ["average_weights", "average_models", "average_files"]

PathLike = str | os.PathLike


def average_weights(
    models: Sequence[keras.Model], schedule: Any = None, *, accumulate_dtype: Any = None
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
    models: Sequence[keras.Model], schedule: Any = None, *, accumulate_dtype: Any = None
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


class _RunningSum:
    """``sum_i w_i * x_i`` over weight lists fed one at a time, with the core's kernel.

    Per element this is :func:`polyak.average`'s computation in the same order (the weights
    split into coefficients and one divisor by the kernel, weight-0 snapshots skipped, the
    first one assigned, the rest added, one division at the end), hence equal bit for bit.
    Variables may come one at a time from an iterator, so that no full numpy copy of a model
    is ever held besides the sums.
    """

    def __init__(self, divisor: float, accumulate_dtype: Any = None) -> None:
        self.divisor = divisor
        self.accumulate_dtype = accumulate_dtype
        self.started = False  # a nonzero-weight snapshot has been assigned
        self.dtypes: list[np.dtype] = []
        self.sums: list[np.ndarray | None] = []
        self.newest: list[np.ndarray | None] = []  # int/bool variables: the newest is kept
        self.scratch: dict[np.dtype, np.ndarray] = {}  # one per dtype, largest variable's size

    def add(self, leaves: Iterable[np.ndarray], w: float) -> None:
        for j, x in enumerate(leaves):
            x = np.asarray(x)
            if j == len(self.sums):
                self._allocate(x)
            acc = self.sums[j]
            if acc is None:
                self.newest[j] = np.array(x, copy=True)
            elif w != 0:
                scratch = self.scratch[acc.dtype][: acc.size].reshape(acc.shape)
                _kernel.accumulate(acc, x, w, scratch, first=not self.started)
        self.started = self.started or w != 0

    def _allocate(self, x: np.ndarray) -> None:
        self.dtypes.append(x.dtype)
        self.newest.append(None)
        if _kernel.dtype_kind(x.dtype) not in ("float", "complex"):
            self.sums.append(None)
            return
        acc = np.empty(x.shape, _kernel.accumulator_dtype(x.dtype, self.accumulate_dtype))
        self.sums.append(acc)
        if self.scratch.get(acc.dtype, np.empty(0)).size < acc.size:
            self.scratch[acc.dtype] = np.empty(acc.size, acc.dtype)

    def result(self) -> list[np.ndarray]:
        self.scratch.clear()
        out = []
        for acc, newest, dtype in zip(self.sums, self.newest, self.dtypes):
            if acc is None:
                out.append(newest)
                continue
            # float32/float64 variables are divided in place, as polyak.average does.
            final = acc if acc.dtype == dtype else np.empty(acc.shape, dtype)
            _kernel.finalize(acc, final, self.divisor)
            out.append(final)
        return out


def average_files(
    paths: Sequence[PathLike],
    schedule: Any = None,
    *,
    model: keras.Model | None = None,
    accumulate_dtype: Any = None,
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

    Returns:
        A model holding the averaged weights: the clone of ``model``, or else the model of the
        newest file, compiled from that file's compile config with a fresh optimizer.

    Raises:
        EmptyInputError: ``paths`` is empty.
        ModelFileError: a file is missing, of another kind, or cannot be loaded (the message
            names ``paths[i]``), or a ``.weights.h5`` file is given without ``model``.
        StructureError, ShapeError, DtypeError: a file's architecture differs from the first
            one's (the message names the layer and ``paths[i]``).

    Example:
        >>> paths = sorted(glob.glob("checkpoints/epoch_*.keras"))  # doctest: +SKIP
        >>> model = polyak.keras.average_files(paths[-10:], "exponential")  # doctest: +SKIP
    """
    paths = [os.fspath(p) for p in nonempty(paths, "paths")]
    _files.check_files(paths, model is not None)
    _kernel.accumulator_dtype(np.float32, accumulate_dtype)  # checked before any read
    coefficients, divisor = _kernel.split_weights(weights(schedule, len(paths)))
    total = _RunningSum(divisor, accumulate_dtype)
    ref = None if model is None else layout(model, "model")
    holder = None if model is None else empty_copy(model, "model")
    ref_label = "model"
    current = None
    last = len(paths) - 1
    for i, path in enumerate(paths):
        if coefficients[i] == 0 and i != last:
            continue  # as in polyak.average, a weight-0 snapshot is never read
        label = f"paths[{i}] {path!r}"
        if holder is None and current is not None:
            # Release the previous model before reading the next one.
            del current
            _files.release()
        current = _files.load(path, holder, label, compile=i == last)
        mine = layout(current, label)
        if ref is None:
            ref, ref_label = mine, label
        else:
            check_layout(mine, label, ref, ref_label)
        # One variable at a time: no numpy copy of the whole model.
        total.add((v.numpy() for v in current.weights), float(coefficients[i]))
    current.set_weights(total.result())
    if current.compiled:
        # Loading restored the newest snapshot's optimizer state; it does not belong to the
        # average.
        current.compile_from_config(current.get_compile_config())
    return current
