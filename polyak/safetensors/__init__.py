"""Read, write and merge safetensors checkpoints in bounded memory.

``load``/``save`` move a pytree of arrays to and from a ``.safetensors`` file or a sharded
Hugging Face directory; ``merge`` averages N checkpoints on disk into one, streaming tensor by
tensor so that memory stays bounded whatever the model's size.

Example:
    >>> import numpy as np, os, tempfile
    >>> import polyak.safetensors as pst
    >>> d = tempfile.mkdtemp()
    >>> paths = [os.path.join(d, f"ckpt_{i}.safetensors") for i in range(4)]
    >>> for i, p in enumerate(paths):
    ...     pst.save({"w": np.full(3, float(i), np.float32)}, p)
    >>> pst.merge(paths, os.path.join(d, "avg.safetensors")).weights
    (0.25, 0.25, 0.25, 0.25)
"""

from polyak.safetensors._errors import (
    CheckpointError,
    HeaderError,
    OutputError,
    OutputWriteError,
)
from polyak.safetensors._io import load, read_metadata, save
from polyak.safetensors._merge import (
    MergePlan,
    MergeReport,
    OrderWarning,
    merge,
    merge_many,
    plan_merge,
)
from polyak.safetensors._reader import Checkpoint

__all__ = [
    "load",
    "save",
    "merge",
    "read_metadata",
    "Checkpoint",
    "MergeReport",
    "MergePlan",
    "OrderWarning",
    "plan_merge",
    "merge_many",
    "HeaderError",
    "CheckpointError",
    "OutputError",
    "OutputWriteError",
]
