"""Online averaging: fold snapshots into a running average, one training step at a time.

The core is a pure pair over an :class:`OnlineState` NamedTuple, in the manner of optax's
``(init, update)``: :func:`init` makes the empty state, :func:`update` folds in the next
snapshot and :func:`value` reads the average out. :class:`Averager` is the thin stateful
wrapper a training loop uses, and what saves and resumes.

The fold is the schedule's online form: ``avg_1 = x_1`` and
``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, which after ``n`` updates equals
``polyak.average(snapshots, schedule)`` up to rounding. Each leaf is computed in its own
library and stays on its device (see :mod:`polyak._online_leaves`). Half-precision leaves are
accumulated in float32 and rounded once when read: rounding the average back to bf16's 8
significant bits at every step would lose the small ``(1 - decay) * x`` terms entirely.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import optree

from polyak import _online_leaves as _leaves
from polyak import schedules as _schedules
from polyak._errors import EmptyInputError, NoOnlineFormError, PolyakError, StructureError
from polyak._kernel import check_int_policy
from polyak._tree import flatten, path_mismatch, where

__all__ = ["OnlineState", "init", "update", "value", "Averager"]

_ROOT = "params"
_STATE_KEYS = ("count", "average", "dtypes", "schedule", "int_policy")
# Keys of the safetensors __metadata__ written by Averager.save.
_META_FORMAT = "polyak.format"
_FORMAT = "polyak.Averager/1"


class OnlineState(NamedTuple):
    """The state of an online average.

    Attributes:
        count: The number of snapshots folded in.
        average: ``None`` before the first update, then a pytree shaped like the snapshots
            whose leaves are the accumulators: float leaves in float32 (bf16, f16, fp8
            snapshots) or their own dtype, int/bool leaves as the int policy keeps them
            (float64 for ``"average"``).
        dtypes: The snapshots' leaf dtypes, in flattening order, which :func:`value` rounds
            the accumulators back to.
    """

    count: int
    average: Any
    dtypes: tuple[Any, ...]


def init() -> OnlineState:
    """The state of an average of no snapshots.

    Returns:
        ``OnlineState(count=0, average=None, dtypes=())``.

    Example:
        >>> import numpy as np
        >>> from polyak import _online, schedules
        >>> state = _online.init()
        >>> state = _online.update(state, {"w": np.array([1.0, 3.0])}, schedules.equal())
        >>> state = _online.update(state, {"w": np.array([3.0, 5.0])}, schedules.equal())
        >>> _online.value(state)["w"]
        array([2., 4.])
    """
    return OnlineState(count=0, average=None, dtypes=())


def update(
    state: OnlineState,
    params: Any,
    schedule: _schedules.Schedule,
    *,
    int_policy: str = "last",
    workspace: dict[Any, Any] | None = None,
) -> OnlineState:
    """Fold the next snapshot into the average.

    .. note::
        ``state``'s accumulators are donated: numpy and torch ones are overwritten in place
        and shared with the returned state, so keep only the returned state (as with JAX's
        buffer donation). The snapshot itself is never modified.

    Args:
        state: The state so far, from :func:`init` or an earlier :func:`update`.
        params: The snapshot: a pytree with the leaf paths, shapes and array types of the
            first one (the container types may differ: a ``state_dict()`` OrderedDict and a
            dict of the same names match). Torch tensors are detached.
        schedule: A :class:`polyak.Schedule` with an online form.
        int_policy: For int/bool leaves: ``"last"`` keeps the newest, ``"first"`` the first,
            ``"average"`` averages in float64 (rounded half to even when read), ``"error"``
            refuses them, as in :func:`polyak.average`.
        workspace: A dict of scratch buffers, filled on first use; passing the same one every
            time is what keeps numpy updates free of allocations.

    Returns:
        The new state, ``count`` one larger.

    Raises:
        NoOnlineFormError: ``schedule`` has no online form.
        StructureError: leaf paths missing or unexpected compared with the first snapshot.
        ShapeError: a leaf's shape differs from the first snapshot's.
        DtypeError: a leaf cannot be averaged, changes kind (float/complex/int), array
            library or device, or is an int/bool leaf under ``int_policy="error"``.

    Example:
        >>> import numpy as np
        >>> from polyak import _online, schedules
        >>> s = _online.update(_online.init(), [np.zeros(2)], schedules.ema(0.75))
        >>> _online.value(_online.update(s, [np.ones(2)], schedules.ema(0.75)))
        [array([0.25, 0.25])]
    """
    if not schedule.online:
        raise _no_online_form(schedule)
    check_int_policy(int_policy)
    if workspace is None:
        workspace = {}
    # Plain flattening: leaf accessors cost a third of an update's Python overhead and only
    # name leaves in errors, so they are made only then (or when the containers differ).
    leaves, spec = optree.tree_flatten(params)
    leaves = [_leaves.as_array(leaf) for leaf in leaves]
    if state.count == 0 or state.average is None:
        accessors = spec.accessors()
        accs = [
            _leaves.first(x, int_policy, where(a, root=_ROOT)) for x, a in zip(leaves, accessors)
        ]
        return OnlineState(1, spec.unflatten(accs), tuple(x.dtype for x in leaves))

    accs, acc_spec = optree.tree_flatten(state.average)
    accessors = None
    if spec != acc_spec:
        leaves, accessors = _match_paths(acc_spec.accessors(), spec.accessors(), leaves)
    for j, (acc, x, dtype) in enumerate(zip(accs, leaves, state.dtypes)):
        _leaves.check(acc, x, dtype, partial(_leaf_path, spec, accessors, j))
    t = state.count + 1
    decay = schedule.decay(t)
    new = [_leaves.fold(acc, x, decay, int_policy, workspace) for acc, x in zip(accs, leaves)]
    return OnlineState(t, acc_spec.unflatten(new), state.dtypes)


def value(state: OnlineState) -> Any:
    """The average held by ``state``, each leaf in its snapshots' dtype and array type.

    Accumulators wider than their snapshots (float32 for bf16) are rounded once, here; int
    leaves averaged with ``int_policy="average"`` are rounded half to even. The result shares
    no memory with the state, so later updates leave it alone.

    Args:
        state: A state with at least one snapshot folded in.

    Returns:
        A pytree with the structure of the snapshots.

    Raises:
        EmptyInputError: no snapshot has been folded in.

    Example:
        >>> import numpy as np
        >>> from polyak import _online, schedules
        >>> state = _online.update(_online.init(), [np.float32(2.0)], schedules.equal())
        >>> _online.value(state)
        [array(2., dtype=float32)]
    """
    if state.count == 0 or state.average is None:
        raise EmptyInputError("no snapshot has been averaged yet: call update(params) first")
    accs, spec = optree.tree_flatten(state.average)
    return spec.unflatten([_leaves.read(acc, d) for acc, d in zip(accs, state.dtypes)])


def _leaf_path(spec: optree.PyTreeSpec, accessors: list[Any] | None, j: int) -> str:
    """Where leaf ``j`` of a snapshot is, for an error message."""
    return where((spec.accessors() if accessors is None else accessors)[j], root=_ROOT)


def _no_online_form(schedule: _schedules.Schedule) -> NoOnlineFormError:
    return NoOnlineFormError(
        f"schedule {schedule!r} has no online form: its weights depend on the final number of "
        "snapshots, so a running average cannot fold them in one at a time. Save the snapshots "
        "with polyak.SnapshotDir(path, keep=...).save(params, step) and average them at the "
        f"end with .average({schedule!r}), or pick an online schedule such as 'equal', "
        "'linear', ema(decay), swa(start), polynomial(eta), power(gamma) or ema_warmup()"
    )


def _match_paths(
    old_accessors: list[Any], new_accessors: list[Any], leaves: list[Any]
) -> tuple[list[Any], list[Any]]:
    """``leaves`` in the order of ``old_accessors``, when only the container types differ.

    ``model.state_dict()`` (an OrderedDict) and ``dict(model.named_parameters())`` name the
    same leaves in other containers: what must match is the leaf paths.

    Raises:
        StructureError: listing every missing and unexpected leaf path, sorted.
    """
    error = path_mismatch(
        new_accessors, old_accessors, _ROOT, "the structure of the first snapshot"
    )
    if error is not None:
        raise error
    old = [where(a, root=_ROOT) for a in old_accessors]
    by_path = {where(a, root=_ROOT): (leaf, a) for a, leaf in zip(new_accessors, leaves)}
    matched = [by_path[path] for path in old]
    return [leaf for leaf, _ in matched], [a for _, a in matched]


def _tensor_names(tree: Any) -> list[str]:
    """The safetensors names :func:`polyak.safetensors.save` gives the leaves of ``tree``."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [".".join(str(p) for p in path) for path in paths]


class Averager:
    """A running average of parameter snapshots, for a training loop.

    Call :meth:`update` after each step (or epoch) with the current parameters; :attr:`value`
    is the average so far, with the parameters' structure, dtypes and array types. The
    schedule's online form gives the fold
    ``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, ``avg_1 = x_1``, so after ``n``
    updates :attr:`value` equals ``polyak.average(snapshots, schedule)`` up to rounding.

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

    Raises:
        NoOnlineFormError: the schedule has no online form (the message points to
            :class:`polyak.SnapshotDir`).
        ScheduleError: the schedule cannot be resolved.
        PolyakError: ``int_policy`` is not one of the four.

    Example:
        >>> import numpy as np, polyak
        >>> avg = polyak.Averager("equal")
        >>> for w in (1.0, 2.0, 6.0):
        ...     avg.update({"w": np.full(2, w)})
        >>> avg.count, avg.value["w"]
        (3, array([3., 3.]))
    """

    def __init__(self, schedule: Any = "equal", *, int_policy: str = "last") -> None:
        resolved = _schedules.resolve(schedule)
        if not resolved.online:
            raise _no_online_form(resolved)
        self._schedule = resolved
        self._int_policy = check_int_policy(int_policy)
        self._state = init()
        self._workspace: dict[Any, Any] = {}
        # Set by load(): accumulators by tensor name, until the first update tells which
        # pytree, array library and device they belong to.
        self._loaded: dict[str, np.ndarray] | None = None
        self._loaded_dtypes: dict[str, str] = {}

    @property
    def schedule(self) -> _schedules.Schedule:
        """The schedule, resolved."""
        return self._schedule

    @property
    def int_policy(self) -> str:
        """How int/bool leaves are combined."""
        return self._int_policy

    @property
    def count(self) -> int:
        """The number of snapshots folded in."""
        return self._state.count

    @property
    def value(self) -> Any:
        """The current average, as a new pytree (later updates leave it alone).

        Leaves are arrays of the snapshots' library, dtype and device; Python and numpy
        scalar leaves come back as 0-d numpy arrays.

        Right after :meth:`load` and before any :meth:`update`, it is a flat dict of numpy
        arrays keyed by tensor name (the keys of a ``state_dict()``, or nested keys joined by
        ``"."``).

        Raises:
            EmptyInputError: no snapshot has been folded in.
        """
        if self._loaded is not None:
            return {
                name: _leaves.read(acc, np.dtype(self._loaded_dtypes[name]))
                for name, acc in self._loaded.items()
            }
        return value(self._state)

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
        if self._loaded is not None:
            self._adopt(params)
        self._state = update(
            self._state,
            params,
            self._schedule,
            int_policy=self._int_policy,
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
        if self._loaded is not None:
            raise PolyakError(
                "this Averager was loaded from a file and has not seen a snapshot yet, so the "
                "pytree its state belongs to is unknown: call update(params) first, or save() "
                "it again"
            )
        state = self._state
        average = None
        if state.average is not None:
            accs, _, spec = flatten(state.average)
            average = spec.unflatten([_leaves.copy(acc) for acc in accs])
        return {
            "count": state.count,
            "average": average,
            "dtypes": [_leaves.dtype_name(d) for d in state.dtypes],
            "schedule": {"name": self._schedule.name, "params": dict(self._schedule.params)},
            "int_policy": self._int_policy,
        }

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
        if not isinstance(state_dict, Mapping):
            raise PolyakError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = sorted(set(_STATE_KEYS) - set(state_dict))
        if missing:
            raise PolyakError(f"state_dict is missing the keys {missing}")
        self._check_config(state_dict["schedule"], state_dict["int_policy"], "state_dict")
        count = _check_count(state_dict["count"], "state_dict['count']")
        average = state_dict["average"]
        if (count == 0) != (average is None):
            raise PolyakError(
                f"state_dict['count'] is {count} but state_dict['average'] is "
                f"{'None' if average is None else 'set'}: an empty state has count 0 and no "
                "average"
            )
        if average is None:
            self._state, self._loaded = init(), None
            return
        accs, _, spec = flatten(average)
        names = state_dict["dtypes"]
        if not isinstance(names, (list, tuple)) or len(names) != len(accs):
            raise PolyakError(
                f"state_dict['dtypes'] must list one dtype per leaf of state_dict['average'] "
                f"({len(accs)}), got {names!r:.200}"
            )
        accs = [_leaves.copy(_leaves.as_array(acc)) for acc in accs]
        dtypes = tuple(_leaves.dtype_from_name(n, acc) for n, acc in zip(names, accs))
        self._state = OnlineState(count, spec.unflatten(accs), dtypes)
        self._loaded = None

    def save(self, path: str | os.PathLike[str]) -> None:
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
        from polyak import safetensors as st

        if self._loaded is not None:
            tensors, names = self._loaded, list(self._loaded)
            dtypes = [self._loaded_dtypes[n] for n in names]
        else:
            if self._state.average is None:
                raise EmptyInputError("nothing to save: call update(params) first")
            tensors = self._state.average
            names = _tensor_names(tensors)
            dtypes = [_leaves.dtype_name(d) for d in self._state.dtypes]
        metadata = {
            _META_FORMAT: _FORMAT,
            "polyak.count": str(self.count),
            "polyak.schedule": json.dumps(
                {"name": self._schedule.name, "params": _jsonable(self._schedule.params)}
            ),
            "polyak.int_policy": self._int_policy,
            "polyak.dtypes": json.dumps(dict(zip(names, dtypes))),
        }
        st.save(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Averager:
        """Resume an averager written by :meth:`save`, with its schedule and int policy.

        The accumulators are read as numpy arrays; the first :meth:`update` moves each one to
        the library and device of the matching parameter (by leaf path), so a torch run on a
        GPU resumes on the GPU.

        Args:
            path: A file written by :meth:`save`.

        Returns:
            The averager, with its count restored.

        Raises:
            PolyakError: the file was not written by :meth:`save` or its metadata is
                malformed (naming the file and the key).
            CheckpointError: the path is not a safetensors file.

        Example:
            >>> import numpy as np, os, tempfile, polyak
            >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
            >>> avg = polyak.Averager(polyak.schedules.ema(0.5))
            >>> avg.update({"w": np.zeros(2)}); avg.save(path)
            >>> resumed = polyak.Averager.load(path)
            >>> resumed.update({"w": np.full(2, 4.0)})
            >>> resumed.schedule.name, resumed.count, resumed.value["w"]
            ('ema', 2, array([2., 2.]))
        """
        from polyak import safetensors as st

        shown = os.fspath(path)
        meta = st.read_metadata(path) or {}
        if meta.get(_META_FORMAT) != _FORMAT:
            raise PolyakError(
                f"{shown}: not an Averager state (no {_META_FORMAT}={_FORMAT!r} in its "
                "metadata); write one with Averager.save(path)"
            )
        try:
            spec = json.loads(meta["polyak.schedule"])
            dtypes = json.loads(meta["polyak.dtypes"])
            count = int(meta["polyak.count"])
            int_policy = meta["polyak.int_policy"]
            schedule = _schedules.from_spec(spec["name"], spec["params"])
            # (inside the try: a bad schedule or int policy is a PolyakError, a ValueError)
            averager = cls(schedule, int_policy=int_policy)
        except (KeyError, TypeError, ValueError) as err:
            raise PolyakError(f"{shown}: malformed Averager metadata: {err!r}") from None
        if not isinstance(dtypes, dict) or not all(isinstance(v, str) for v in dtypes.values()):
            raise PolyakError(
                f"{shown}: malformed Averager metadata: polyak.dtypes must map tensor names to "
                f"dtype names, got {dtypes!r:.200}"
            )
        tensors = st.load(path)
        if set(tensors) != set(dtypes) or count < 1:
            raise PolyakError(
                f"{shown}: the metadata names {sorted(dtypes)} with count {count}, but the "
                f"file holds the tensors {sorted(tensors)}"
            )
        averager._loaded = tensors
        averager._loaded_dtypes = dtypes
        averager._state = OnlineState(count, None, ())
        return averager

    def _adopt(self, params: Any) -> None:
        """Give the accumulators read by :meth:`load` the structure, library and device of
        ``params``, matched by tensor name."""
        assert self._loaded is not None
        leaves, accessors, spec = flatten(params)
        names = _tensor_names(params)
        missing = sorted(set(self._loaded) - set(names))
        unexpected = sorted(set(names) - set(self._loaded))
        if missing or unexpected:
            raise StructureError(
                f"{_ROOT} does not match the saved average: missing {missing}, unexpected "
                f"{unexpected} (names as polyak.safetensors.save gives them)"
            )
        accs, dtypes = [], []
        for name, leaf, accessor in zip(names, leaves, accessors):
            x = _leaves.as_array(leaf)
            acc = _leaves.to_library_of(self._loaded[name], x)
            dtype = _leaves.dtype_from_name(self._loaded_dtypes[name], x)
            _leaves.check(acc, x, dtype, partial(where, accessor, root=_ROOT))
            accs.append(acc)
            dtypes.append(dtype)
        self._state = OnlineState(self._state.count, spec.unflatten(accs), tuple(dtypes))
        self._loaded = None

    def _check_config(self, schedule: Any, int_policy: Any, source: str) -> None:
        mine = {"name": self._schedule.name, "params": _jsonable(self._schedule.params)}
        try:
            theirs = {"name": schedule["name"], "params": _jsonable(schedule["params"])}
        except (KeyError, TypeError):
            raise PolyakError(
                f"{source}['schedule'] must be {{'name': ..., 'params': {{...}}}}, got "
                f"{schedule!r:.200}"
            ) from None
        if mine != theirs:
            raise PolyakError(
                f"{source} holds an average with schedule {theirs}, but this Averager uses "
                f"{mine}: resuming with another schedule would not continue the same average "
                "(make the Averager with the saved schedule)"
            )
        if int_policy != self._int_policy:
            raise PolyakError(
                f"{source} holds an average with int_policy={int_policy!r}, but this Averager "
                f"uses int_policy={self._int_policy!r}"
            )

    def __repr__(self) -> str:
        return (
            f"Averager(schedule={self._schedule!r}, int_policy={self._int_policy!r}, "
            f"count={self.count})"
        )


def _check_count(count: Any, name: str) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise PolyakError(f"{name} must be a non-negative int, got {count!r}")
    return int(count)


def _jsonable(params: Mapping[str, Any]) -> Any:
    # Schedule parameters as they read back from JSON metadata (tuples become lists, numpy
    # floats Python floats), so that a saved schedule compares equal to the one it came from.
    return json.loads(json.dumps(dict(params), default=float, sort_keys=True))
