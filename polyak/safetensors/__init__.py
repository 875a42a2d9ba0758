"""Read, write and merge safetensors checkpoints in bounded memory.

``load``/``save`` move a pytree of arrays to and from a ``.safetensors`` file or a sharded
Hugging Face directory; ``merge`` averages N checkpoints on disk into one, streaming tensor by
tensor so that memory stays bounded whatever the model's size.

Example:
    >>> import numpy as np, os, tempfile
    >>> import polyak.safetensors as pst
    >>> run = tempfile.mkdtemp()
    >>> for step in (100, 200, 300, 400):
    ...     pst.save({"w": np.full(3, step / 100, np.float32)}, f"{run}/step_{step}.safetensors")
    >>> ckpts = [os.path.join(run, c) for c in sorted(os.listdir(run))]  # in natural order
    >>> pst.merge(ckpts, os.path.join(run, "avg.safetensors")).weights
    (0.25, 0.25, 0.25, 0.25)
"""

from polyak._errors import OrderWarning as OrderWarning  # polyak.OrderWarning, kept here too
from polyak.safetensors._errors import (
    CheckpointError,
    HeaderError,
    OutputError,
    OutputWriteError,
)
from polyak.safetensors._io import load, read_metadata, save
from polyak.safetensors._merge import merge, merge_many, plan_merge
from polyak.safetensors._options import (
    CheckpointMergeSettings,
    ManyMergeSettings,
    MergeSettings,
)
from polyak.safetensors._reader import Checkpoint
from polyak.safetensors._results import MergePlan, MergeReport

__all__ = [
    "load",
    "save",
    "merge",
    "read_metadata",
    "Checkpoint",
    "MergeReport",
    "MergePlan",
    "plan_merge",
    "merge_many",
    "MergeSettings",
    "ManyMergeSettings",
    "CheckpointMergeSettings",
    "HeaderError",
    "CheckpointError",
    "OutputError",
    "OutputWriteError",
]
