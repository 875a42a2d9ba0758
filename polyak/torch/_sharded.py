"""DTensor specifics: FSDP2 (``fully_shard``) and tensor-parallel parameters are DTensors.

An average of DTensor parameters is made of DTensors with the same mesh and placements, so
each rank folds its own local shard with plain foreach kernels and no collective is ever
issued; ``state_dict()`` then hands DTensors to ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # torch.distributed is optional in some builds (e.g. some macOS wheels)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None

__all__ = ["is_dtensor", "local", "locals_of"]


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded or replicated distributed tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is a plain tensor).

    Writing into the result writes into ``t``: the local tensor shares its storage.
    """
    return t.to_local() if is_dtensor(t) else t


def locals_of(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`local` of each tensor.

    Called at every update for sharded models: FSDP2 may re-point a parameter's local shard
    (on lazy initialization, or after ``load_state_dict``), so a shard taken once could go
    stale. The average's own DTensors never change, so their shards are taken once.
    """
    return [local(t) for t in tensors]
