"""Which optimizer steps a trainer callback folds (polyak.lightning, polyak.transformers).

Both callbacks count optimizer steps the way their trainer does (``trainer.global_step``,
``state.global_step``: 1 after the first step), so that the rule survives a resume from a
checkpoint: it depends on the step number only, never on how many calls the callback saw.
"""

from __future__ import annotations

from typing import Any

from polyak._errors import check_int


def check_step_args(every_n_steps: Any, start_step: Any) -> tuple[int, int]:
    """Validate ``every_n_steps`` (an int >= 1) and ``start_step`` (an int >= 0).

    Raises:
        PolyakError: naming the bad argument and its value.
    """
    return check_int("every_n_steps", every_n_steps, 1), check_int("start_step", start_step, 0)


def is_fold_step(step: int, every_n_steps: int, start_step: int) -> bool:
    """Whether the weights after optimizer step ``step`` (1, 2, ...) are folded.

    The first ``start_step`` steps are skipped; then every ``every_n_steps``-th step folds:
    steps ``start_step + every_n_steps``, ``start_step + 2 * every_n_steps``, ...
    """
    return step > start_step and (step - start_step) % every_n_steps == 0
