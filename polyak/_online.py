"""``polyak.Averager``: the stateful wrapper over :mod:`polyak.online` for training loops."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from polyak import _kernel, online
from polyak import _online_file as _file
from polyak import schedules as _schedules
from polyak._types import IntPolicy, PathLike, ScheduleLike

__all__ = ["Averager"]


class Averager:
    """A running average of parameter snapshots, for a training loop.

    Call :meth:`update` after each step (or epoch) with the current parameters; :attr:`value`
    is the average so far, with the parameters' structure, dtypes and array types. The
    schedule's online form gives the fold
    ``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, ``avg_1 = x_1``, so after ``n``
    updates :attr:`value` equals ``polyak.average(snapshots, schedule)`` up to rounding. The
    pure functions underneath are :mod:`polyak.online`.

    Leaves may be numpy arrays, torch tensors (CPU or GPU; ``requires_grad`` parameters are
    detached), JAX arrays or other array-API arrays such as CuPy's. The average stays in the
    leaf's library and on its device: numpy and torch averages are updated in place, with no
    allocation after the first update; JAX ones are replaced by new arrays. bf16, f16 and fp8
    leaves are accumulated in float32 and rounded once, when :attr:`value` is read.

    .. note::
        Schedules whose weights depend on the final count (``tail(k)``, ``custom``) have no
        online form and are refused: save snapshots with :class:`polyak.SnapshotDir` and
        average them at the end instead.

    Args:
        schedule: An online schedule: a name (``"equal"``, ``"linear"``...), a
            :class:`polyak.Schedule` such as ``polyak.schedules.ema(0.999)``, or anything
            :func:`polyak.schedules.resolve` accepts.
        int_policy: For int/bool leaves (step counters, masks): ``"last"`` keeps the newest,
            ``"first"`` the first, ``"average"`` averages and rounds half to even,
            ``"error"`` refuses them.
        accumulate_dtype: Raise the accumulators' precision, e.g. ``"float64"``.

    Raises:
        NoOnlineFormError: the schedule has no online form (the message points to
            :class:`polyak.SnapshotDir`).
        ScheduleError: the schedule cannot be resolved.
        PolyakError: ``int_policy`` is not one of the four.
        DtypeError: ``accumulate_dtype`` is not a float or complex dtype.

    Example:
        >>> import numpy as np, polyak
        >>> avg = polyak.Averager("equal")
        >>> for w in (1.0, 2.0, 6.0):
        ...     avg.update({"w": np.full(2, w)})
        >>> avg.count, avg.value["w"]
        (3, array([3., 3.]))
    """

    def __init__(
        self,
        schedule: ScheduleLike = "equal",
        *,
        int_policy: IntPolicy = "last",
        accumulate_dtype: np.dtype | str | None = None,
    ) -> None:
        resolved = _schedules.resolve(schedule)
        if not resolved.online:
            raise online.no_online_form(resolved)
        _kernel.accumulator_dtype(np.float32, accumulate_dtype)  # checked now, not at update 1
        self._schedule = resolved
        self._int_policy = _kernel.check_int_policy(int_policy)
        self._accumulate_dtype = accumulate_dtype
        self._state = online.init()
        self._workspace: dict[Any, Any] = {}

    @property
    def schedule(self) -> _schedules.Schedule:
        """The schedule, resolved."""
        return self._schedule

    @property
    def int_policy(self) -> str:
        """How int/bool leaves are combined."""
        return self._int_policy

    @property
    def accumulate_dtype(self) -> Any:
        """The requested accumulation precision (``None``: the default rule)."""
        return self._accumulate_dtype

    @property
    def state(self) -> online.OnlineState:
        """The :class:`polyak.online.OnlineState` (shared: later updates change it in place)."""
        return self._state

    @property
    def count(self) -> int:
        """The number of snapshots folded in."""
        return self._state.count

    @property
    def value(self) -> Any:
        """The current average, as a new pytree (later updates leave it alone).

        Leaves are arrays of the snapshots' library, dtype and device; Python and numpy
        scalar leaves come back as 0-d numpy arrays.

        Raises:
            EmptyInputError: no snapshot has been folded in.
        """
        return online.value(self._state)

    def update(self, params: Any) -> None:
        """Fold the next snapshot into the average.

        Args:
            params: The current parameters, a pytree (dict, list, ``model.state_dict()``,
                JAX/Flax params...) with the same leaf paths, shapes and array types at every
                call.

        Raises:
            StructureError: leaf paths missing or unexpected compared with the first
                snapshot (all of them listed).
            ShapeError: a leaf's shape differs from the first snapshot's, naming the leaf.
            DtypeError: a leaf cannot be averaged, or its kind, array library or device
                changed, naming the leaf.

        Example:
            >>> import numpy as np, polyak
            >>> avg = polyak.Averager(polyak.schedules.ema(0.5))
            >>> avg.update([np.array(0.0)])
            >>> avg.update([np.array(4.0)])
            >>> avg.value
            [array(2.)]
        """
        self._state = online.update(
            self._state,
            params,
            self._schedule,
            int_policy=self._int_policy,
            accumulate_dtype=self._accumulate_dtype,
            workspace=self._workspace,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as a copy that later updates leave alone.

        Returns:
            ``{"count", "average", "dtypes", "schedule", "int_policy"}``: the count, a copy
            of the accumulators as a pytree shaped like the snapshots (``None`` before the
            first update), the snapshots' dtype names in flattening order, the schedule as
            ``{"name": ..., "params": {...}}`` and the int policy.

        Example:
            >>> import numpy as np, polyak
            >>> avg = polyak.Averager()
            >>> avg.update({"w": np.ones(2)})
            >>> sd = avg.state_dict()
            >>> sd["count"], sd["schedule"], sd["dtypes"]
            (1, {'name': 'equal', 'params': {}}, ['float64'])
        """
        return _file.to_dict(self._state, self._schedule, self._int_policy)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, so that updating goes on bit for bit as if the run
        had not been interrupted.

        Args:
            state_dict: A dict from :meth:`state_dict` (the accumulators are copied).

        Raises:
            PolyakError: a key is missing or malformed, or the schedule or int policy differ
                from this averager's (resuming with other ones would not continue the same
                average).

        Example:
            >>> import numpy as np, polyak
            >>> avg = polyak.Averager("linear")
            >>> avg.update({"w": np.zeros(2)}); avg.update({"w": np.ones(2)})
            >>> resumed = polyak.Averager("linear")
            >>> resumed.load_state_dict(avg.state_dict())
            >>> resumed.update({"w": np.full(2, 4.0)})
            >>> resumed.count, resumed.value["w"]
            (3, array([2.33333333, 2.33333333]))
        """
        self._state = _file.from_dict(state_dict, self._schedule, self._int_policy)

    def save(self, path: PathLike) -> None:
        """Write the state to a safetensors file, atomically.

        The accumulators are the tensors (named as :func:`polyak.safetensors.save` names
        them: nested keys joined by ``"."``); the count, schedule, int policy and dtypes are
        JSON in the ``__metadata__``. :meth:`load` resumes from it bit for bit.

        Args:
            path: A ``*.safetensors`` file; an existing one is replaced only once the new one
                is completely written.

        Raises:
            EmptyInputError: nothing has been averaged yet.
            DtypeError: an accumulator has no safetensors dtype (complex leaves).
            OutputWriteError: the file system refused the write; nothing is left behind.

        Example:
            >>> import numpy as np, os, tempfile, polyak
            >>> avg = polyak.Averager("linear")
            >>> avg.update({"w": np.zeros(2)}); avg.update({"w": np.ones(2)})
            >>> path = os.path.join(tempfile.mkdtemp(), "avg.safetensors")
            >>> avg.save(path)
            >>> polyak.Averager.load(path).count
            2
        """
        _file.save(path, self._state, self._schedule, self._int_policy)

    @classmethod
    def load(cls, path: PathLike, like: Any = None) -> Averager:
        """Resume an averager written by :meth:`save`, with its schedule and int policy.

        Args:
            path: A file written by :meth:`save`.
            like: The parameters the run goes on with (e.g. ``model.state_dict()``): the
                average takes their structure, array library and device (a torch run on a
                GPU resumes on the GPU), matched by tensor name. ``None`` keeps numpy arrays
                in a flat dict by tensor name, for numpy snapshots of that shape.

        Returns:
            The averager, with its count restored.

        Raises:
            PolyakError: the file was not written by :meth:`save` or its metadata is
                malformed (naming the file and the key).
            StructureError: ``like`` has other tensor names (all listed).
            ShapeError, DtypeError: a leaf of ``like`` does not match the saved one.
            CheckpointError: the path is not a safetensors file.

        Example:
            >>> import numpy as np, os, tempfile, polyak
            >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
            >>> avg = polyak.Averager(polyak.schedules.ema(0.5))
            >>> avg.update({"w": np.zeros(2)}); avg.save(path)
            >>> resumed = polyak.Averager.load(path, like={"w": np.ones(2)})
            >>> resumed.update({"w": np.full(2, 4.0)})
            >>> resumed.schedule.name, resumed.count, resumed.value["w"]
            ('ema', 2, array([2., 2.]))
        """
        loaded = _file.load(path, like)
        averager = cls(loaded.schedule, int_policy=loaded.int_policy)
        averager._state = loaded.state
        return averager

    def __repr__(self) -> str:
        return (
            f"Averager(schedule={self._schedule!r}, int_policy={self._int_policy!r}, "
            f"count={self.count})"
        )
