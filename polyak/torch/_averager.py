"""``ModelAverager``: a running average of a ``torch.nn.Module``'s weights, kept in place.

At construction the averager takes the model's tensors by name, gives each a role (see
:mod:`polyak.torch._layout`), allocates the average's storage, and groups the averaged
tensors by (device, dtype) into lists it keeps. An update is then a handful of foreach
kernel launches (the torch backend's foreach folds), one or two per group, and no per-tensor
Python work. Like a ``torch.optim`` optimizer it keeps references to the model's tensors,
so it sees the optimizer's in-place steps without walking the module tree again.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from polyak import _backend
from polyak import schedules as _schedules
from polyak._errors import DtypeError, EmptyInputError, PolyakError
from polyak.online import no_online_form
from polyak.torch import _state
from polyak.torch._layout import (
    accumulator_dtype,
    generation,
    match,
    named_tensors,
    role_of,
    spec_of,
)
from polyak.torch._sharded import is_dtensor, local, locals_of

_TORCH = _backend.get(torch.empty(0))  # the one torch backend: folds, copies, int rounding

__all__ = ["ModelAverager"]

_SIDE_ROLES = ("last", "first", "int_average")


@dataclass
class _Group:
    """Averaged tensors sharing the average's and the model's (device, dtype)."""

    names: list[str]
    accs: list[torch.Tensor]  # local shards of the average, taken once
    sharded: bool
    staging: list[torch.Tensor] | None  # the model's tensors copied to the average's device
    sync: torch.device | None  # the CUDA device to wait for after a non-blocking copy out


@dataclass
class _Plan:
    """One model's tensors, in the order of the averager's groups and side lists."""

    groups: list[list[torch.Tensor]]
    side: dict[str, list[torch.Tensor]]
    side_sharded: bool = False

    def side_locals(self) -> dict[str, list[torch.Tensor]]:
        """The side tensors (copied or int-averaged) as local shards."""
        if not self.side_sharded:
            return self.side
        return {r: locals_of(srcs) for r, srcs in self.side.items()}

    def targets(self) -> list[torch.Tensor]:
        """Every tensor of the model, as local shards (what copy_to writes)."""
        out = [t for srcs in self.groups for t in locals_of(srcs)]
        return out + [t for srcs in self.side.values() for t in locals_of(srcs)]


class ModelAverager:
    """A running average of a PyTorch model's parameters and buffers, updated in place.

    ``avg_1 = x_1`` and ``avg_t = decay(t) * avg_{t-1} + (1 - decay(t)) * x_t``, with
    ``decay`` the online form of ``schedule``: ``ema(d)`` equals torch's
    ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)`` and
    ``"equal"`` its default SWA running mean. Storage is allocated here, so a fresh
    averager's :meth:`state_dict` is a valid load target.

    Args:
        model: the ``torch.nn.Module`` whose weights are averaged; :meth:`update`,
            :meth:`copy_to` and :meth:`applied` use it when given no other model.
        schedule: a polyak schedule with an online form: a name (``"equal"``,
            ``"linear"``) or a :class:`polyak.Schedule` (``polyak.schedules.ema(0.999)``).
        buffers: ``"average"`` folds float buffers (BatchNorm statistics) like parameters,
            int/bool buffers follow ``int_policy``; ``"copy"`` copies every buffer from the
            newest model.
        device: where the average lives, e.g. ``"cpu"`` for a model on a GPU (the copy out
            goes through pinned memory, without blocking, one wait per update); default: each
            tensor's own device.
        dtype: the accumulator dtype of real floating tensors; default float32 for
            fp16/bf16/fp8 tensors, otherwise the tensor's own dtype.
        every: fold only calls ``every``, ``2 * every``, ...; the other calls return at once.
        int_policy: int/bool tensors (``num_batches_tracked``): ``"last"`` keeps the newest,
            ``"first"`` the first, ``"average"`` a rounded, clipped weighted mean (kept in
            float64), ``"error"`` refuses them.

    Raises:
        PolyakError: ``model`` is not a module, or an option is not one of its values.
        NoOnlineFormError: ``schedule`` has no online form (``tail``, ``custom``).
        DtypeError: an int/bool tensor is averaged under ``int_policy="error"``.

    .. note::
        Like an optimizer, the averager keeps references to the model's tensors, so an
        update walks no module tree. It takes them again only when some module registers a
        parameter or buffer (torch's global registration hooks tell it), e.g. after
        ``load_state_dict(..., assign=True)``.

    Example:
        >>> import torch, polyak, polyak.torch as pt
        >>> model = torch.nn.Linear(2, 1)
        >>> avg = pt.ModelAverager(model, polyak.schedules.ema(0.9))
        >>> for step in range(3):
        ...     with torch.no_grad():
        ...         model.bias.fill_(float(step))
        ...     avg.update()
        >>> avg.count, round(avg.value["bias"].item(), 4)
        (3, 0.29)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        schedule: Any = "equal",
        *,
        buffers: str = "average",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        every: int = 1,
        int_policy: str = "last",
    ) -> None:
        self._schedule = _online_schedule(schedule)
        self._options = _state.options(buffers, every, int_policy, dtype)
        self._model = model
        tensors, self._names = named_tensors(model)
        self._specs = {name: spec_of(t) for name, t in tensors.items()}
        params = {id(p) for p in model.parameters()}
        roles = {
            name: _role(name, t, id(t) in params, buffers, int_policy)
            for name, t in tensors.items()
        }
        target = None if device is None else torch.device(device)
        self._acc = {n: _allocate(t, roles[n], dtype, target) for n, t in tensors.items()}
        self._groups = _make_groups(tensors, self._acc, roles)
        self._side = {r: [n for n, role in roles.items() if role == r] for r in _SIDE_ROLES}
        self._side_accs = {r: [local(self._acc[n]) for n in ns] for r, ns in self._side.items()}
        self._plan = self._make_plan(tensors)
        self._generation = generation()
        self._other: tuple[weakref.ref, _Plan] | None = None
        self._count = 0
        self._calls = 0
        self._workspace: dict[Any, Any] = {}  # the CPU cast's scratch, reused every update

    @property
    def count(self) -> int:
        """The number of updates folded in so far (calls skipped by ``every`` do not count)."""
        return self._count

    @property
    def schedule(self) -> _schedules.Schedule:
        """The schedule whose online form the averager folds."""
        return self._schedule

    def __repr__(self) -> str:
        return (
            f"ModelAverager({self._schedule!r}, count={self._count}, "
            f"tensors={len(self._acc)}, groups={len(self._groups)})"
        )

    def update(self, model: torch.nn.Module | None = None) -> None:
        """Fold the model's current parameters and buffers into the average.

        Args:
            model: a model with the same parameter and buffer names, shapes, dtypes, devices
                and shardings as the one given at construction; default: that one.

        Raises:
            StructureError, ShapeError, DtypeError: ``model``'s tensors differ, naming them.
            ScheduleError: the schedule has no decay for this count (an ``explicit``
                schedule shorter than the run).
        """
        self._calls += 1
        if self._calls % self._options["every"]:
            return
        try:
            plan = self._plan_for(model)
            t = self._count + 1
            decay = 0.0 if t == 1 else self._schedule.decay(t)
            with torch.no_grad():
                self._fold(plan, t, decay)
        except RuntimeError:
            self._calls -= 1
            # A foreach kernel refused the tensors: a parameter changed shape or device after
            # construction. Say which one, instead of the kernel's message.
            match(self._specs, named_tensors(model or self._model)[0], "the model")
            raise
        except PolyakError:
            self._calls -= 1
            raise
        self._count = t

    def _fold(self, plan: _Plan, t: int, decay: float) -> None:
        for g, srcs in zip(self._groups, plan.groups):
            xs = locals_of(srcs) if g.sharded else srcs
            if t == 1:
                _TORCH.foreach_copy(g.accs, xs)
                continue
            if g.staging is not None:
                _TORCH.foreach_copy(g.staging, xs, non_blocking=True)
                if g.sync is not None:
                    torch.cuda.current_stream(g.sync).synchronize()
                xs = g.staging
            _TORCH.foreach_fold(g.accs, xs, decay, self._workspace)
        side = plan.side_locals()
        accs = self._side_accs
        _TORCH.foreach_copy(accs["last"], side["last"])
        if t == 1:
            _TORCH.foreach_copy(accs["first"], side["first"])
            _TORCH.foreach_copy(accs["int_average"], side["int_average"])
        else:
            for a, x in zip(accs["int_average"], side["int_average"]):
                a.mul_(decay).add_(x.to(a.device, torch.float64), alpha=1.0 - decay)

    def _make_plan(self, tensors: dict[str, torch.Tensor]) -> _Plan:
        side = {r: [tensors[n] for n in names] for r, names in self._side.items()}
        return _Plan(
            [[tensors[n] for n in g.names] for g in self._groups],
            side,
            any(is_dtensor(t) for srcs in side.values() for t in srcs),
        )

    def _plan_for(self, model: torch.nn.Module | None) -> _Plan:
        if model is None or model is self._model:
            if self._generation != generation():
                # Some module re-registered a tensor: take the model's tensors again.
                tensors, _ = named_tensors(self._model)
                match(self._specs, tensors, "the model")
                self._plan, self._generation = self._make_plan(tensors), generation()
            return self._plan
        if self._other is not None and self._other[0]() is model:
            return self._other[1]
        tensors, _ = named_tensors(model)
        match(self._specs, tensors, f"the {type(model).__name__} given")
        plan = self._make_plan(tensors)
        self._other = (weakref.ref(model), plan)
        return plan

    def _check_started(self) -> None:
        if self._count == 0:
            raise EmptyInputError("nothing averaged yet: call update() first")

    @property
    def value(self) -> dict[str, torch.Tensor]:
        """The average, keyed like ``model.state_dict()``, in the model's dtypes.

        New tensors on the average's device (DTensors for a sharded model), sharing no
        memory with the averager; tied weights share one tensor, as in ``state_dict()``.

        Raises:
            EmptyInputError: nothing has been folded in yet.
        """
        self._check_started()
        with torch.no_grad():
            read = {n: self._read(n) for n in self._acc}
        return {name: read[first] for name, first in self._names.items()}

    def _read(self, name: str) -> torch.Tensor:
        return _TORCH.cast(self._acc[name], self._specs[name].dtype)

    def copy_to(self, model: torch.nn.Module | None = None) -> None:
        """Write the average into a model, in the model's own dtypes and devices.

        Args:
            model: default: the model given at construction.

        Raises:
            EmptyInputError: nothing has been folded in yet.
            StructureError, ShapeError, DtypeError: ``model``'s tensors differ.
        """
        self._check_started()
        plan = self._plan_for(model)
        with torch.no_grad():
            for g, srcs in zip(self._groups, plan.groups):
                _TORCH.foreach_copy(locals_of(srcs) if g.sharded else srcs, g.accs)
            side = plan.side_locals()
            for role in ("last", "first"):
                _TORCH.foreach_copy(side[role], self._side_accs[role])
            for dst, acc in zip(side["int_average"], self._side_accs["int_average"]):
                dst.copy_(_TORCH.round_clip(acc.to(dst.device), dst.dtype))

    @contextmanager
    def applied(self, model: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """Hold the average in the model inside the block; restore its weights after.

        The model's own weights are kept in a copy on entry and written back on exit, bit
        for bit, also when the block raises.

        Args:
            model: default: the model given at construction.

        Yields:
            The model, holding the average.

        Raises:
            EmptyInputError: nothing has been folded in yet.
        """
        self._check_started()
        target = self._model if model is None else model
        live = self._plan_for(model).targets()
        with torch.no_grad():
            saved = [t.clone() for t in live]
        self.copy_to(model)
        try:
            yield target
        finally:
            with torch.no_grad():
                _TORCH.foreach_copy(live, saved)

    def averaged_model(self) -> torch.nn.Module:
        """A new module, a deep copy of the model, holding the average (for export or eval).

        Raises:
            EmptyInputError: nothing has been folded in yet.
        """
        self._check_started()
        clone = copy.deepcopy(self._model)
        self.copy_to(clone)
        return clone

    def state_dict(self) -> dict[str, Any]:
        """The averager's state: the accumulators, the count and the settings.

        The ``"average"`` tensors are the averager's own storage (as ``Module.state_dict()``
        returns a module's), so ``torch.distributed.checkpoint.load`` fills them in place;
        ``torch.save`` writes them, and ``torch.load(..., weights_only=True)`` reads them.
        For a sharded model they are DTensors.

        Example:
            >>> import torch, polyak.torch as pt
            >>> avg = pt.ModelAverager(torch.nn.Linear(2, 1), "equal")
            >>> sorted(avg.state_dict())
            ['average', 'calls', 'count', 'options', 'schedule']
        """
        return {
            "count": torch.tensor(self._count, dtype=torch.int64),
            "calls": torch.tensor(self._calls, dtype=torch.int64),
            "average": dict(self._acc),
            "schedule": _state.schedule_spec(self._schedule),
            "options": _state.plain_options(self._options),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the run then continues bit for bit.

        Raises:
            StructureError: keys missing or unexpected, listed.
            ShapeError, DtypeError: an accumulator that does not fit, named.
            ScheduleError, PolyakError: saved with another schedule or other options.
        """
        _state.check_settings(state_dict, self._schedule, self._options)
        average = state_dict["average"]
        _state.check_average(average, self._acc)
        with torch.no_grad():
            for name, acc in self._acc.items():
                if average[name] is not acc:
                    local(acc).copy_(local(average[name]))
        self._count = int(state_dict["count"])
        self._calls = int(state_dict["calls"])


def _online_schedule(schedule: Any) -> _schedules.Schedule:
    s = _schedules.resolve(schedule)
    if not s.online:
        raise no_online_form(s)
    return s


def _role(name: str, t: torch.Tensor, is_param: bool, buffers: str, int_policy: str) -> str:
    role = role_of(t, is_param=is_param, buffers=buffers, int_policy=int_policy)
    if role == "error":
        raise DtypeError(
            f"{name}: {t.dtype} tensor cannot be averaged with int_policy='error' (use "
            "'last', 'first' or 'average', or buffers='copy' for buffers)"
        )
    return role


def _allocate(
    t: torch.Tensor, role: str, dtype: torch.dtype | None, device: torch.device | None
) -> torch.Tensor:
    """Zeroed storage for one tensor's average (a DTensor alike, for a DTensor)."""
    acc_dtype = accumulator_dtype(t, role, dtype)
    if is_dtensor(t):
        if device is not None and not _same_device(device, t.device):
            raise PolyakError(
                f"device={device}: a sharded (DTensor) model's average lives with its shards "
                f"on {t.device}; leave device=None"
            )
        return torch.zeros_like(t.detach(), dtype=acc_dtype)
    where = t.device if device is None else device
    return torch.zeros(t.shape, dtype=acc_dtype, device=where)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _make_groups(
    tensors: dict[str, torch.Tensor], acc: dict[str, torch.Tensor], roles: dict[str, str]
) -> list[_Group]:
    """Group the averaged tensors by the average's and the model's (device, dtype)."""
    keyed: dict[tuple, list[str]] = {}
    for name, role in roles.items():
        if role == "float":
            t, a = tensors[name], acc[name]
            key = (a.device, a.dtype, t.device, t.dtype, is_dtensor(t))
            keyed.setdefault(key, []).append(name)
    groups = []
    for (a_dev, _, t_dev, t_dtype, sharded), names in keyed.items():
        staging = sync = None
        if not _same_device(a_dev, t_dev):
            pin = a_dev.type == "cpu" and t_dev.type == "cuda"
            staging = [
                torch.empty(tensors[n].shape, dtype=t_dtype, device=a_dev, pin_memory=pin)
                for n in names
            ]
            sync = t_dev if pin else None
        accs = [local(acc[n]) for n in names]
        groups.append(_Group(names, accs, sharded, staging, sync))
    return groups
