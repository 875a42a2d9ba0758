"""Weight averaging for Lightning: a callback on :class:`polyak.torch.ModelAverager`.

The ``[lightning]`` extra; ``import polyak`` does not import it. The callback averages the
``LightningModule`` itself, so the average's keys are the module's ``state_dict()`` keys,
and it works for every strategy whose module holds plain tensors (single device, DDP) or
DTensors (Lightning's ``ModelParallelStrategy``, which shards with FSDP2 ``fully_shard``):
there each rank folds its own shard, without communication.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import optree
import torch

import polyak
from polyak._errors import PolyakError, check_int
from polyak._trainer_steps import check_step_args, is_fold_step
from polyak.torch import ModelAverager

if TYPE_CHECKING:
    from polyak._snapshots import SnapshotDir

__all__ = ["WeightAveraging"]


def _is_dtensor(x: Any) -> bool:
    # DTensor lives in torch.distributed, which a CPU-only build may lack.
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _full(tree: Any) -> Any:
    """``tree`` with each DTensor gathered into a plain tensor (a collective: every rank calls)."""
    return optree.tree_map(lambda x: x.full_tensor() if _is_dtensor(x) else x, tree)


def _reshard(tree: Any, like: Any) -> Any:
    """Full tensors of ``tree`` placed as the DTensors of ``like`` are (every rank calls)."""
    from torch.distributed.tensor import distribute_tensor

    def place(new: Any, cur: Any) -> Any:
        if not _is_dtensor(cur):
            return new
        full = new.to(device=cur.device, dtype=cur.dtype)
        return distribute_tensor(full, cur.device_mesh, cur.placements)

    return optree.tree_map(place, tree, like)


class WeightAveraging(pl.Callback):
    """A Lightning callback keeping a polyak weight average of the ``LightningModule``.

    After each optimizer step chosen by ``every_n_steps`` and ``start_step``, the module's
    parameters and buffers are folded into a :class:`polyak.torch.ModelAverager` (exposed as
    :attr:`averager`; built when fit starts, after the strategy has placed or sharded the
    module). During validation and test the module holds the average, and its own weights
    come back bit for bit afterwards. The averager's state goes into Lightning checkpoints
    (this callback's ``state_dict``), so ``trainer.fit(ckpt_path=...)`` continues the same
    average, bit for bit. The checkpoint's ``state_dict`` keeps the raw weights, which
    training resumes from.

    With ``snapshot_dir``, snapshots are written with :class:`polyak.SnapshotDir` (named by
    the global step) for choosing the average after training: for a
    :func:`polyak.schedules.power` schedule, the running power EMA with its ``t`` and
    ``gamma`` (:func:`polyak.posthoc.save_snapshot`), ready for
    :func:`polyak.posthoc.reconstruct`; for any other schedule, the raw weights that were
    folded, which ``callback.snapshots.average(schedule)`` averages with any schedule
    afterwards (``tail(k)`` included). Sharded weights are gathered for this (every rank
    takes part, rank 0 writes).

    Args:
        schedule: Any schedule with an online form (``"equal"`` for SWA,
            ``polyak.schedules.ema(0.999)``, ``power(sigma_rel=0.05)``...).
        every_n_steps: Fold after every n-th optimizer step.
        start_step: Optimizer steps to skip first: the first fold follows step
            ``start_step + every_n_steps`` (steps count from 1, like ``trainer.global_step``).
        buffers: ``"average"`` or ``"copy"``, as for :class:`~polyak.torch.ModelAverager`.
        device: Where the average lives (e.g. ``"cpu"`` while training on a GPU); default:
            with the module.
        swap_for_validation: Validate and test with the average.
        swap_on_end: Write the average into the module when fit ends.
        snapshot_dir: A directory for snapshots; it must hold none when a fit starts afresh
            (resuming from a checkpoint drops those newer than the checkpoint instead).
        keep: Keep only the newest ``keep`` snapshot files (needs ``snapshot_dir``).
        snapshot_every_n_steps: Take a snapshot at fold steps that are multiples of this
            (default: at every fold).

    Raises:
        PolyakError: a bad ``every_n_steps``, ``start_step``, ``keep`` or
            ``snapshot_every_n_steps``, or a schedule without an online form.
        ScheduleError: the schedule cannot be resolved.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> ema = polyak.lightning.WeightAveraging(polyak.schedules.ema(0.999))  # doctest: +SKIP
        >>> pl.Trainer(callbacks=[ema]).fit(module, train_loader, val_loader)  # doctest: +SKIP
        >>> averaged = ema.averager.averaged_model()  # doctest: +SKIP
    """

    def __init__(
        self,
        schedule: Any = "equal",
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        buffers: str = "average",
        device: torch.device | str | None = None,
        swap_for_validation: bool = True,
        swap_on_end: bool = False,
        snapshot_dir: str | os.PathLike[str] | None = None,
        keep: int | None = None,
        snapshot_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.every_n_steps, self.start_step = check_step_args(every_n_steps, start_step)
        self.schedule = polyak.schedules.resolve(schedule)
        if not self.schedule.online:
            raise polyak.NoOnlineFormError(
                f"schedule {self.schedule!r} has no online form: average with an online "
                "schedule and pass snapshot_dir= to choose another one after training"
            )
        if keep is not None and snapshot_dir is None:
            raise PolyakError(f"keep={keep!r} needs a snapshot_dir to keep snapshots in")
        if snapshot_every_n_steps is not None:
            check_int("snapshot_every_n_steps", snapshot_every_n_steps, 1)
        self.buffers = buffers
        self.device = device
        self.swap_for_validation = bool(swap_for_validation)
        self.swap_on_end = bool(swap_on_end)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.snapshots: SnapshotDir | None = (
            None if snapshot_dir is None else polyak.SnapshotDir(snapshot_dir, keep=keep)
        )
        self.averager: ModelAverager | None = None
        self._module: torch.nn.Module | None = None
        self._last_step = 0  # the global step last considered: accumulation repeats it
        self._pending: dict[str, Any] | None = None  # state loaded before the averager exists
        self._swapped = contextlib.ExitStack()

    # --- building and folding ---------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the averager over the module as the strategy set it up."""
        if self.averager is None or self._module is not pl_module:
            self.averager = ModelAverager(
                pl_module, self.schedule, buffers=self.buffers, device=self.device
            )
            self._module = pl_module
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        elif self.snapshots is not None and self._last_step == 0 and len(self.snapshots):
            raise PolyakError(
                f"snapshot_dir {str(self.snapshots.path)!r} already holds "
                f"{len(self.snapshots)} snapshots: use an empty directory for a new fit, "
                "so that its snapshots are of this run only"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Fold once per optimizer step (micro-batches of gradient accumulation do not step)."""
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not is_fold_step(step, self.every_n_steps, self.start_step):
            return
        assert self.averager is not None
        self.averager.update()
        every = self.snapshot_every_n_steps
        if self.snapshots is not None and (every is None or step % every == 0):
            self._snapshot(trainer, step)

    def _snapshot(self, trainer: pl.Trainer, step: int) -> None:
        assert self.averager is not None and self.snapshots is not None
        if self.schedule.name == "power":
            params = self.averager.value
            meta = polyak.posthoc.snapshot_metadata(
                self.averager.count, self.schedule.params["gamma"]
            )
        else:
            params = self._module.state_dict()  # what was just folded
            meta = {}
        params = _full(dict(params))  # a collective for sharded weights: before the rank test
        if trainer.is_global_zero:
            self.snapshots.save(
                {k: v.detach().cpu() for k, v in params.items()},
                step,
                metadata={**meta, "global_step": str(step)},
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the average into the module, with ``swap_on_end``."""
        if self.swap_on_end and self.averager is not None and self.averager.count:
            self.averager.copy_to(pl_module)

    # --- evaluating with the average -----------------------------------------------------

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        averager = self.averager
        if self.swap_for_validation and averager is not None and averager.count:
            if self._module is pl_module:
                self._swapped.enter_context(averager.applied(pl_module))

    def _swap_out(self) -> None:
        self._swapped.close()  # the module's own weights come back, bit for bit

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the average into the module for validation."""
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the module its own weights back."""
        self._swap_out()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the average into the module for testing."""
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the module its own weights back."""
        self._swap_out()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Give the module its own weights back when validation or test raised."""
        self._swap_out()

    # --- checkpoints -----------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        """The key of this callback's state in checkpoints: unique per configuration.

        Lightning refuses two stateful callbacks with one key, and several averages (an
        EMA and an SWA, say) may train side by side; resuming needs the same arguments.
        """
        return self._generate_state_key(
            schedule=repr(self.schedule),
            every_n_steps=self.every_n_steps,
            start_step=self.start_step,
            buffers=self.buffers,
            snapshot_dir=None if self.snapshots is None else str(self.snapshots.path),
        )

    def state_dict(self) -> dict[str, Any]:
        """The averager's state (sharded averages gathered: every rank calls) and the step."""
        if self.averager is None:
            return {} if self._pending is None else dict(self._pending)
        return {"averager": _full(self.averager.state_dict()), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; kept until fit starts when the averager is not built."""
        if not state_dict:
            return
        if "averager" not in state_dict or "last_step" not in state_dict:
            raise PolyakError(
                "this checkpoint's WeightAveraging state has keys "
                f"{sorted(state_dict)}, expected ['averager', 'last_step']"
            )
        if self.averager is None:
            self._pending = dict(state_dict)
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.averager is not None
        self.averager.load_state_dict(_reshard(state["averager"], self.averager.state_dict()))
        self._last_step = int(state["last_step"])
        if self.snapshots is not None:
            # Snapshots newer than the checkpoint belong to the interrupted run; the resumed
            # run writes its own (which a deterministic run makes equal).
            for step, path in zip(self.snapshots.steps(), self.snapshots.paths()):
                if step > self._last_step:
                    path.unlink(missing_ok=True)
