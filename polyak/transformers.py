"""Weight averaging for the Hugging Face ``Trainer``: a callback on ``polyak.torch.ModelAverager``.

The ``[transformers]`` extra; ``import polyak`` does not import it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import transformers

import polyak
from polyak._errors import PolyakError
from polyak._trainer_steps import check_step_args, is_fold_step
from polyak.online import no_online_form
from polyak.torch import ModelAverager

__all__ = ["WeightAveragingCallback", "AVERAGE_DIR", "STATE_FILE"]

AVERAGE_DIR = "average"
"""The folder, inside each ``checkpoint-N/`` and the output directory, holding the average."""
STATE_FILE = "polyak_averager.pt"
"""The file, inside each ``checkpoint-N/``, holding the averager's state for resuming."""


class WeightAveragingCallback(transformers.TrainerCallback):
    """A ``transformers.TrainerCallback`` keeping a polyak weight average of the model.

    After each optimizer step chosen by ``every_n_steps`` and ``start_step``
    (``on_step_end``), the model's parameters and buffers are folded into a
    :class:`polyak.torch.ModelAverager`, exposed as :attr:`averager` once training begins.

    - **Evaluation.** The evaluations the Trainer runs during ``train()`` (``eval_strategy``)
      see the average, and the model's own weights come back bit for bit afterwards. The
      Trainer has no event before an evaluation, so the swap happens at the end of a step or
      epoch whose evaluation the Trainer has scheduled; for a ``trainer.evaluate()`` of your
      own, write ``with callback.averager.applied(): trainer.evaluate()``.
    - **Checkpoints.** With each ``checkpoint-N/`` the Trainer saves, the callback writes
      ``checkpoint-N/average/`` (``save_pretrained``: loads with ``from_pretrained``) and
      ``checkpoint-N/polyak_averager.pt``, the averager's full-precision state. At the end of
      training it writes ``<output_dir>/average/``.
    - **Resuming.** ``trainer.train(resume_from_checkpoint=...)`` continues the average saved
      in the checkpoint, found as ``<output_dir>/checkpoint-<step>/`` (or the
      ``resume_from_checkpoint`` training argument); for a checkpoint elsewhere, call
      :meth:`load_checkpoint` first. A ``train()`` from step 0 starts a new average.

    Args:
        schedule: Any schedule with an online form (``"equal"``,
            ``polyak.schedules.ema(0.999)``, ``"ema_warmup"``...).
        every_n_steps: Fold after every n-th optimizer step.
        start_step: Optimizer steps to skip first: the first fold follows step
            ``start_step + every_n_steps`` (steps count from 1, like ``state.global_step``).
        device: Where the average lives (e.g. ``"cpu"``); default: with the model.
        swap_for_evaluation: Evaluate with the average during training.
        save_average: Write ``average/`` folders (the state file is always written, so that
            checkpoints can be resumed).

    Raises:
        PolyakError: a bad ``every_n_steps`` or ``start_step``, or a schedule without an
            online form.
        ScheduleError: the schedule cannot be resolved.

    Example:
        >>> ema = polyak.transformers.WeightAveragingCallback("ema_warmup")  # doctest: +SKIP
        >>> trainer = transformers.Trainer(model, args, callbacks=[ema], ...)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained(f"{args.output_dir}/average")  # doctest: +SKIP
    """

    def __init__(
        self,
        schedule: Any = "equal",
        *,
        every_n_steps: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
        swap_for_evaluation: bool = True,
        save_average: bool = True,
    ) -> None:
        self.every_n_steps, self.start_step = check_step_args(every_n_steps, start_step)
        self.schedule = polyak.schedules.resolve(schedule)
        if not self.schedule.online:
            raise no_online_form(self.schedule)
        self.device = device
        self.swap_for_evaluation = bool(swap_for_evaluation)
        self.save_average = bool(save_average)
        self.averager: ModelAverager | None = None
        self._loaded: dict[str, Any] | None = None  # from load_checkpoint(), before train()
        self._swapped = contextlib.ExitStack()

    def load_checkpoint(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Continue the average saved in ``checkpoint_dir`` at the next ``train()``.

        Needed only when ``train(resume_from_checkpoint=...)`` names a checkpoint outside
        ``args.output_dir``.

        Raises:
            PolyakError: ``checkpoint_dir`` holds no ``polyak_averager.pt``.
        """
        self._loaded = _read_state(Path(checkpoint_dir) / STATE_FILE)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        """Start a new average, or restore the checkpoint's when resuming."""
        self.averager = ModelAverager(model, self.schedule, device=self.device)
        loaded, self._loaded = self._loaded, None
        if state.global_step == 0 or state.global_step <= self.start_step:
            return  # nothing was folded before this point
        if loaded is None:
            loaded = _read_state(self._resumed_checkpoint(args, state) / STATE_FILE)
        if loaded["global_step"] != state.global_step:
            raise PolyakError(
                f"the averager state is of step {loaded['global_step']}, but training "
                f"resumes at step {state.global_step}"
            )
        self.averager.load_state_dict(loaded["averager"])

    def _resumed_checkpoint(self, args: Any, state: Any) -> Path:
        named = args.resume_from_checkpoint
        if isinstance(named, (str, os.PathLike)) and os.path.isdir(named):
            return Path(named)
        return Path(args.output_dir) / f"checkpoint-{state.global_step}"

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        """Fold after the chosen optimizer steps; swap the average in for a coming evaluation."""
        if is_fold_step(state.global_step, self.every_n_steps, self.start_step):
            self.averager.update()
        self._maybe_swap_in(control, model)

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        """Swap the average in when the Trainer evaluates at the end of the epoch."""
        self._maybe_swap_in(control, model)

    def _maybe_swap_in(self, control: Any, model: Any) -> None:
        # Our callback runs after the Trainer's DefaultFlowCallback, which sets should_evaluate.
        averager = self.averager
        if control.should_evaluate and self.swap_for_evaluation and averager.count:
            self._swapped.close()
            self._swapped.enter_context(averager.applied(model))

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any):
        """Give the model its own weights back after the evaluation."""
        self._swapped.close()

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        """Write ``average/`` and the averager state into the checkpoint just saved."""
        self._swapped.close()  # an evaluation that raised must not leave the average in
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise PolyakError(
                f"the Trainer saved a checkpoint, but {str(folder)!r} is not a directory: "
                "WeightAveragingCallback expects checkpoints in args.output_dir"
            )
        if state.is_world_process_zero:
            if self.save_average and self.averager.count:
                self._save_average(model, folder / AVERAGE_DIR)
            state_dict = {"averager": self.averager.state_dict(), "global_step": state.global_step}
            torch.save(state_dict, folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        """Write ``<output_dir>/average/``."""
        self._swapped.close()
        if self.save_average and self.averager.count and state.is_world_process_zero:
            self._save_average(model, Path(args.output_dir) / AVERAGE_DIR)

    def _save_average(self, model: Any, folder: Path) -> None:
        # Saved from the model itself holding the average: no second copy of it in memory.
        with self.averager.applied(model):
            model.save_pretrained(folder)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PolyakError(
            f"cannot resume the weight average: {str(path)!r} does not exist (the checkpoint "
            "was saved without WeightAveragingCallback, or lies outside args.output_dir: "
            "call callback.load_checkpoint(checkpoint_dir) before train())"
        )
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or {"averager", "global_step"} - set(state):
        raise PolyakError(f"{str(path)!r} is not a polyak averager state file")
    return state
