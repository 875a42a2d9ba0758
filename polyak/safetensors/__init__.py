"""Read, write and merge safetensors checkpoints in bounded memory.

``load``/``save`` move a pytree of arrays to and from a ``.safetensors`` file or a sharded
Hugging Face directory; ``merge`` averages N checkpoints on disk into one, streaming tensor by
tensor so that memory stays bounded whatever the model's size.
"""

from polyak.safetensors._errors import (
    CheckpointError,
    HeaderError,
    MismatchError,
    OutputError,
    OutputWriteError,
)
from polyak.safetensors._io import load, read_metadata, save
from polyak.safetensors._reader import Checkpoint

__all__ = [
    "load",
    "save",
    "read_metadata",
    "Checkpoint",
    "HeaderError",
    "CheckpointError",
    "MismatchError",
    "OutputError",
    "OutputWriteError",
]
