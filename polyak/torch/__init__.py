"""PyTorch-native weight averaging: :class:`ModelAverager` keeps an average of a module's
weights in place, with grouped foreach kernels, CPU offload and FSDP2/DTensor support.

Importing this module imports torch (``import polyak`` alone does not).

Example:
    >>> import torch, polyak.torch as pt
    >>> model = torch.nn.Linear(4, 2)
    >>> avg = pt.ModelAverager(model, "equal")
    >>> avg.update()
    >>> with avg.applied():
    ...     pass  # evaluate(model) here: it holds the average
"""

from polyak.torch._averager import ModelAverager

__all__ = ["ModelAverager"]
