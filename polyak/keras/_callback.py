"""``WeightAveraging``: a Keras callback that keeps a weight average during ``fit()``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from polyak import Averager, SnapshotDir, schedules
from polyak._errors import EmptyInputError, NoOnlineFormError, PolyakError, check_int
from polyak._types import PathLike, ScheduleLike
from polyak.keras._names import weight_names

__all__ = ["WeightAveraging"]


def _check_args(start_epoch: Any, every: Any, snapshot_dir: Any, keep: Any) -> None:
    check_int("start_epoch", start_epoch, 0)
    if every not in ("epoch", "batch"):
        raise PolyakError(f"every must be 'epoch' or 'batch', got every={every!r}")
    if keep is not None and snapshot_dir is None:
        raise PolyakError(f"keep={keep!r} needs a snapshot_dir to keep snapshots in")


def _snapshot_dir(snapshot_dir: PathLike | None, keep: int | None) -> SnapshotDir | None:
    if snapshot_dir is None:
        return None
    snapshots = SnapshotDir(snapshot_dir, keep=keep)
    if len(snapshots):
        raise PolyakError(
            f"snapshot_dir {os.fspath(snapshot_dir)!r} already holds {len(snapshots)} "
            "snapshots: use an empty directory, so that the average is of this run only"
        )
    return snapshots


class WeightAveraging(keras.callbacks.Callback):
    """A Keras callback that keeps a weight average during ``fit()``.

    After each epoch (``every="epoch"``) or each training batch (``every="batch"``) from
    ``start_epoch`` on, the model's weights (all of them, BatchNormalization moving statistics
    included) are folded into a :class:`polyak.Averager` with ``schedule``. At the end of
    training the average replaces the model's weights (``swap_on_end``); it is also available
    as :attr:`average`. With ``snapshot_dir``, every snapshot is also saved as a safetensors
    file through :class:`polyak.SnapshotDir`, so that any other schedule can be chosen
    afterwards (``callback.snapshots.average("linear")``), including those with no online
    form such as ``tail(k)``: for those the average at the end is taken over the saved
    snapshots (the newest ``keep``), and ``snapshot_dir`` is required.

    With ``swap_for_validation=True`` (the option of the same name in
    :class:`polyak.lightning.WeightAveraging`, as Keras' own ``use_ema`` evaluates with its
    EMA), each validation run during ``fit()`` sees the average, the current epoch's weights
    included, and training resumes from its own weights, restored bit for bit.
    :meth:`applied` does the same swap outside ``fit()``.

    .. note::
        After swapping in averaged weights, recompute BatchNormalization statistics with
        :func:`update_batchnorm` if the model has any: the average of moving statistics does
        not describe the averaged network. Snapshot steps count the snapshots this callback
        took (0, 1, ...) across ``fit()`` calls; each file's metadata also records the
        ``epoch`` (and ``batch``) it was taken at.

    Args:
        schedule: The weighting, anything :func:`polyak.schedules.resolve` takes:
            ``"equal"`` (SWA), ``polyak.schedules.ema(0.999)`` (EMA), ``"linear"``...
        start_epoch: First epoch (0-based, as Keras numbers them) whose weights are averaged.
        every: ``"epoch"`` or ``"batch"``: when a snapshot is taken.
        swap_on_end: Put the average into the model when ``fit()`` ends.
        swap_for_validation: Validate with the average during ``fit()`` (``val_*`` logs are
            the average's), then restore the training weights.
        snapshot_dir: A directory for the snapshots; it must not already hold snapshots.
        keep: Keep only the newest ``keep`` snapshot files (needs ``snapshot_dir``).
        accumulate_dtype: Raise the accumulators' precision (e.g. ``"float64"``), as in
            :func:`polyak.average`.

    Raises:
        NoOnlineFormError: the schedule has no online form and no ``snapshot_dir`` is given.
        ScheduleError: the schedule cannot be resolved.
        PolyakError: a bad ``start_epoch``, ``every`` or ``keep``, or a ``snapshot_dir``
            that already holds snapshots.
        DtypeError: ``accumulate_dtype`` is not a float or complex dtype.

    Example:
        >>> swa = polyak.keras.WeightAveraging("equal", start_epoch=75)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=100, callbacks=[swa])  # doctest: +SKIP
        >>> polyak.keras.update_batchnorm(model, x)  # doctest: +SKIP
    """

    def __init__(
        self,
        schedule: ScheduleLike = "equal",
        *,
        start_epoch: int = 0,
        every: str = "epoch",
        swap_on_end: bool = True,
        swap_for_validation: bool = False,
        snapshot_dir: PathLike | None = None,
        keep: int | None = None,
        accumulate_dtype: np.dtype | str | None = None,
    ) -> None:
        super().__init__()
        _check_args(start_epoch, every, snapshot_dir, keep)
        self.schedule = schedules.resolve(schedule)
        self.start_epoch = start_epoch
        self.every = every
        self.swap_on_end = bool(swap_on_end)
        self.swap_for_validation = bool(swap_for_validation)
        self.accumulate_dtype = accumulate_dtype
        self.snapshots = _snapshot_dir(snapshot_dir, keep)
        self.averager = self._averager()
        # Keras runs batch-end hooks of async-safe callbacks in a background thread and
        # otherwise blocks the training loop on them; overriding on_train_batch_end makes
        # Keras assume the latter. Per epoch, that hook does nothing, so say so; per batch,
        # it reads the weights and must run in step with training.
        self.async_safe = every == "epoch"
        self.count = 0  # snapshots taken
        self._names: list[str] | None = None
        self._epoch = 0
        self._taken_epoch: int | None = None  # the epoch already snapshotted (at validation)
        self._fitting = False
        self._swapped = contextlib.ExitStack()

    def _averager(self) -> Averager | None:
        if self.schedule.online:
            return Averager(self.schedule, accumulate_dtype=self.accumulate_dtype)
        if self.snapshots is None:
            raise NoOnlineFormError(
                f"schedule {self.schedule!r} has no online form: pass snapshot_dir= to save "
                "the snapshots and average them when training ends"
            )
        return None

    def _take(self, epoch: int, batch: int | None = None) -> None:
        model = self.model  # (with JAX, reading .model syncs the weights mid-epoch)
        if self._names is None:
            self._names = weight_names(model)
        params = dict(zip(self._names, model.get_weights()))
        if self.averager is not None:
            self.averager.update(params)
        if self.snapshots is not None:
            metadata = {"epoch": str(epoch)}
            if batch is not None:
                metadata["batch"] = str(batch)
            self.snapshots.save(params, self.count, metadata=metadata)
        self.count += 1

    def on_train_begin(self, logs: Any = None) -> None:
        self._fitting = True

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_test_begin(self, logs: Any = None) -> None:
        if not (self.swap_for_validation and self._fitting):
            return  # a model.evaluate(callbacks=[cb]) of the user's: left alone
        # Keras validates before on_epoch_end: this epoch's snapshot is taken now, so that
        # the validated average includes it (the weights cannot change before epoch end).
        if self.every == "epoch" and self._epoch >= self.start_epoch:
            self._take_epoch(self._epoch)
        if self.count:
            self._swapped.enter_context(self.applied())

    def on_test_end(self, logs: Any = None) -> None:
        self._swapped.close()  # the training weights come back, bit for bit

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self.every == "batch" and self._epoch >= self.start_epoch:
            self._take(self._epoch, batch)

    def _take_epoch(self, epoch: int) -> None:
        if self._taken_epoch != epoch:
            self._taken_epoch = epoch
            self._take(epoch)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.every == "epoch" and epoch >= self.start_epoch:
            self._take_epoch(epoch)

    def on_train_end(self, logs: Any = None) -> None:
        self._fitting = False
        self._taken_epoch = None  # a next fit() numbers its epochs from 0 again
        self._swapped.close()
        if self.swap_on_end and self.count:
            self.model.set_weights(self.average)

    @property
    def average(self) -> list[np.ndarray]:
        """The average so far, in ``model.get_weights()`` order.

        Raises:
            EmptyInputError: no snapshot has been taken yet.
        """
        if not self.count:
            raise EmptyInputError(
                f"no snapshot taken yet (start_epoch={self.start_epoch}, every={self.every!r})"
            )
        if self.averager is not None:
            value = self.averager.value
        else:
            value = self.snapshots.average(self.schedule, accumulate_dtype=self.accumulate_dtype)
        return [np.asarray(value[name]) for name in self._names]

    @contextlib.contextmanager
    def applied(self) -> Iterator[Any]:
        """Hold the average in the model for the ``with`` block, then put back the model's
        own weights, bit for bit, even when the block raises.

        Yields:
            The model, holding the average.

        Raises:
            EmptyInputError: no snapshot has been taken yet.
            PolyakError: the callback was never given a model (``fit()`` not run yet).

        Example:
            >>> with callback.applied():  # doctest: +SKIP
            ...     model.evaluate(x_test, y_test)  # the average's score
        """
        model = getattr(self, "model", None)
        if model is None:
            raise PolyakError("applied() needs the model: run fit() with this callback first")
        average = self.average
        own = model.get_weights()  # numpy copies: restoring them is bit-exact
        model.set_weights(average)
        try:
            yield model
        finally:
            model.set_weights(own)
