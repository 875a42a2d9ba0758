"""Online averaging as pure functions: fold snapshots into a running average.

The core is a pure triple over an :class:`OnlineState` NamedTuple, in the manner of optax's
``(init, update)``: :func:`init` makes the empty state, :func:`update` folds in the next
snapshot and :func:`value` reads the average out. :class:`polyak.Averager` is the thin
stateful wrapper a training loop uses.

The fold is the schedule's online form: ``avg_1 = x_1`` and
``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, which after ``n`` updates equals
``polyak.average(snapshots, schedule)`` up to rounding. Each leaf is computed in its own
library and stays on its device. Half-precision leaves are accumulated in float32 and rounded
once when read: rounding the average back to bf16's 8 significant bits at every step would
lose the small ``(1 - decay) * x`` terms entirely.

Example:
    >>> import numpy as np
    >>> from polyak import online, schedules
    >>> state = online.init()
    >>> for w in (1.0, 3.0):
    ...     state = online.update(state, {"w": np.array([w, 2 * w])}, schedules.equal())
    >>> state.count, online.value(state)["w"]
    (2, array([2., 4.]))
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import numpy as np
import optree

from polyak import _kernel
from polyak import _online_leaves as _leaves
from polyak import schedules as _schedules
from polyak._errors import EmptyInputError, NoOnlineFormError
from polyak._tree import path_mismatch, refuse_model, where
from polyak._types import IntPolicy

__all__ = ["OnlineState", "init", "update", "value", "no_online_form"]

# How errors name the snapshot passed to update(): params['dense']['kernel'].
_ROOT = "params"


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

    Example:
        >>> import numpy as np
        >>> from polyak import online, schedules
        >>> state = online.update(online.init(), {"w": np.ones(2, np.float16)}, schedules.equal())
        >>> state.count, state.average["w"].dtype, state.dtypes
        (1, dtype('float32'), (dtype('float16'),))
    """

    count: int
    average: Any
    dtypes: tuple[Any, ...]


def init() -> OnlineState:
    """The state of an average of no snapshots.

    Returns:
        ``OnlineState(count=0, average=None, dtypes=())``.

    Example:
        >>> from polyak import online
        >>> online.init()
        OnlineState(count=0, average=None, dtypes=())
    """
    return OnlineState(count=0, average=None, dtypes=())


def update(
    state: OnlineState,
    params: Any,
    schedule: _schedules.Schedule,
    *,
    int_policy: IntPolicy = "last",
    accumulate_dtype: np.dtype | str | None = None,
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
            ``"average"`` averages in float64 (rounded half to even and clipped when read),
            ``"error"`` refuses them, as in :func:`polyak.average`.
        accumulate_dtype: Raise the accumulators' precision, e.g. ``"float64"``; used when
            the first snapshot makes them.
        workspace: A dict of scratch buffers, filled on first use; passing the same one every
            time is what keeps numpy updates free of allocations.

    Returns:
        The new state, ``count`` one larger.

    Raises:
        NoOnlineFormError: ``schedule`` has no online form.
        StructureError: leaf paths missing or unexpected compared with the first snapshot.
        ShapeError: a leaf's shape differs from the first snapshot's.
        DtypeError: a leaf cannot be averaged, changes kind (float/complex/int), array
            library or device, is an int/bool leaf under ``int_policy="error"``, or
            ``accumulate_dtype`` is not a float or complex dtype.

    Example:
        >>> import numpy as np
        >>> from polyak import online, schedules
        >>> s = online.update(online.init(), [np.zeros(2)], schedules.ema(0.75))
        >>> online.value(online.update(s, [np.ones(2)], schedules.ema(0.75)))
        [array([0.25, 0.25])]
    """
    if not schedule.online:
        raise no_online_form(schedule)
    _kernel.check_int_policy(int_policy)
    if workspace is None:
        workspace = {}
    # Plain flattening: leaf accessors cost a third of an update's Python overhead and only
    # name leaves in errors, so they are made only then (or when the containers differ).
    leaves, spec = optree.tree_flatten(params)
    if len(leaves) == 1 and leaves[0] is params:  # a lone leaf: maybe a model passed by mistake
        refuse_model(params, _ROOT)
    leaves = [_leaves.as_array(leaf) for leaf in leaves]
    if state.count == 0:
        _kernel.accumulator_dtype(np.float32, accumulate_dtype)  # checked even with no floats
        accs = [
            _leaves.first(x, int_policy, where(a, root=_ROOT), accumulate_dtype)
            for x, a in zip(leaves, spec.accessors())
        ]
        return OnlineState(1, spec.unflatten(accs), tuple(x.dtype for x in leaves))

    accs, acc_spec = optree.tree_flatten(state.average)
    accessors = None
    if spec != acc_spec:
        leaves, accessors = _match_paths(acc_spec.accessors(), spec.accessors(), leaves)
    for j, (acc, x, dtype) in enumerate(zip(accs, leaves, state.dtypes)):
        _leaves.check(acc, x, dtype, partial(_leaf_path, spec, accessors, j))
    t = state.count + 1
    new = _leaves.fold_all(accs, leaves, schedule.decay(t), int_policy, workspace)
    return OnlineState(t, acc_spec.unflatten(new), state.dtypes)


def value(state: OnlineState) -> Any:
    """The average held by ``state``, each leaf in its snapshots' dtype and array type.

    Accumulators wider than their snapshots (float32 for bf16) are rounded once, here; int
    leaves averaged with ``int_policy="average"`` are rounded half to even and clipped to
    their dtype's range. The result shares no memory with the state, so later updates leave
    it alone.

    Args:
        state: A state with at least one snapshot folded in.

    Returns:
        A pytree with the structure of the snapshots.

    Raises:
        EmptyInputError: no snapshot has been folded in.

    Example:
        >>> import numpy as np
        >>> from polyak import online, schedules
        >>> state = online.update(online.init(), [np.float32(2.0)], schedules.equal())
        >>> online.value(state)
        [array(2., dtype=float32)]
    """
    if state.count == 0:
        raise EmptyInputError("no snapshot has been averaged yet: call update(params) first")
    accs, spec = optree.tree_flatten(state.average)
    return spec.unflatten([_leaves.read(acc, d) for acc, d in zip(accs, state.dtypes)])


def no_online_form(schedule: _schedules.Schedule) -> NoOnlineFormError:
    """The error for a schedule with no online form, pointing to :class:`polyak.SnapshotDir`.

    Example:
        >>> from polyak import online, schedules
        >>> err = online.no_online_form(schedules.tail(3))
        >>> type(err).__name__, "SnapshotDir" in str(err)
        ('NoOnlineFormError', True)
    """
    return NoOnlineFormError(
        f"schedule {schedule!r} has no online form: its weights depend on the final number of "
        "snapshots, so a running average cannot fold them in one at a time. Save the snapshots "
        "with polyak.SnapshotDir(path, keep=...).save(params, step) and average them at the "
        f"end with .average({schedule!r}), or pick an online schedule such as 'equal', "
        "'linear', ema(decay), swa(start), polynomial(eta), power(gamma) or ema_warmup()"
    )


def _leaf_path(spec: optree.PyTreeSpec, accessors: list[Any] | None, j: int) -> str:
    """Where leaf ``j`` of a snapshot is, for an error message."""
    return where((spec.accessors() if accessors is None else accessors)[j], root=_ROOT)


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
