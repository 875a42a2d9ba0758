"""Read the checkpoints people have: torch files, Hugging Face model folders, DCP, safetensors.

Each kind opens as a reader of the streaming merge core (``keys()``, ``info(name)``,
``read(name, elem_start, out)``), so any of them can be averaged tensor by tensor in bounded
memory. The kind is detected from the content (:func:`detect`), not only the name:

- ``torch``: a ``torch.save`` zip file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``,
  ``.pth.tar``), read without torch and without running its pickle
  (:class:`TorchCheckpoint`);
- ``huggingface``: a ``save_pretrained`` or Trainer ``checkpoint-N/`` folder, weights in
  safetensors or ``pytorch_model*.bin``; :func:`model_files` lists the config and tokenizer
  files a merged folder needs, :func:`config_differences` what differs between configs;
- ``dcp``: a ``torch.distributed.checkpoint`` folder, read one tensor at a time through DCP
  (:class:`DCPCheckpoint`, needs torch);
- ``safetensors``: a file or sharded folder (:class:`polyak.safetensors.Checkpoint`).

Errors are :class:`polyak.safetensors.CheckpointError` (also importable from here) and its
subclasses :class:`UnsafeCheckpointError` and :class:`KeyChoiceError`.

Example:
    >>> import torch, os, tempfile
    >>> import polyak.checkpoints as pc
    >>> p = os.path.join(tempfile.mkdtemp(), "last.ckpt")
    >>> torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, p)
    >>> pc.detect(p)
    'torch'
    >>> with pc.open_checkpoint(p, key="state_dict") as ck:
    ...     ck.read_tensor("w")
    array([1., 1.], dtype=float32)
"""

from polyak.checkpoints._dcp import DCPCheckpoint
from polyak.checkpoints._errors import CheckpointError as CheckpointError
from polyak.checkpoints._errors import ConfigWarning, KeyChoiceError, UnsafeCheckpointError
from polyak.checkpoints._hf import config_differences, find_weights, model_files
from polyak.checkpoints._open import ShardedCheckpoint, detect, open_checkpoint
from polyak.checkpoints._torchzip import TorchCheckpoint

__all__ = [
    "detect",
    "open_checkpoint",
    "TorchCheckpoint",
    "DCPCheckpoint",
    "ShardedCheckpoint",
    "find_weights",
    "model_files",
    "config_differences",
    "UnsafeCheckpointError",
    "KeyChoiceError",
    "ConfigWarning",
]
