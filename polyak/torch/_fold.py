"""Grouped foreach kernels: fold lists of torch tensors into running averages.

Plain functions over lists of tensors that share one device and one dtype per list, so
that one call launches one multi-tensor kernel (on CUDA) or one C++ loop (on CPU) for a
whole group instead of one Python call per tensor. The caller groups tensors once, by
(device, dtype), and reuses the lists at every step: the steady state does no per-tensor
Python work. All functions update their first argument in place and return nothing.

The fold is the schedule's online form ``avg <- decay * avg + (1 - decay) * x``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["copy_", "lerp_", "mul_add_", "fold_", "round_ints_"]

Tensors = Sequence[torch.Tensor]


def copy_(dst: Tensors, src: Tensors, *, non_blocking: bool = False) -> None:
    """``dst[i] <- src[i]`` for every i, converting dtype and device as needed."""
    if dst:
        torch._foreach_copy_(list(dst), list(src), non_blocking=non_blocking)


def lerp_(avg: Tensors, x: Tensors, weight: float) -> None:
    """``avg[i] <- avg[i] + weight * (x[i] - avg[i])``; both lists share one dtype.

    This is ``decay * avg + (1 - decay) * x`` with ``weight = 1 - decay``, the kernel torch's
    ``get_ema_multi_avg_fn`` and ``get_swa_multi_avg_fn`` use, so results agree with them.
    """
    if avg:
        torch._foreach_lerp_(avg, x, weight)


def mul_add_(avg: Tensors, x: Tensors, decay: float) -> None:
    """``avg[i] <- decay * avg[i] + (1 - decay) * x[i]`` for an ``avg`` wider than ``x``.

    ``_foreach_lerp_`` needs one dtype; ``add_`` promotes inside its kernel, so a float32
    average of bf16 weights needs no up-cast copy of the weights.
    """
    if avg:
        torch._foreach_mul_(avg, decay)
        torch._foreach_add_(avg, x, alpha=1.0 - decay)


def fold_(avg: Tensors, x: Tensors, decay: float, *, same_dtype: bool) -> None:
    """Fold ``x`` into ``avg`` with ``decay``: :func:`lerp_` or :func:`mul_add_`."""
    if same_dtype:
        lerp_(avg, x, 1.0 - decay)
    else:
        mul_add_(avg, x, decay)


def round_ints_(dst: Tensors, acc: Tensors) -> None:
    """Write float64 averages of int/bool tensors into ``dst``, rounded half to even, clipped.

    Int buffers are few and small (``num_batches_tracked``), so a per-tensor loop is fine.
    """
    for d, a in zip(dst, acc):
        r = torch.round(a.to(d.device))
        if d.dtype == torch.bool:
            d.copy_(r != 0)
        else:
            info = torch.iinfo(d.dtype)
            d.copy_(r.clamp_(info.min, info.max))
