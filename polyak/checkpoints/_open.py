"""Telling checkpoint kinds apart by content, and opening any of them as a stream reader."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from polyak.checkpoints._dcp import DCPCheckpoint
from polyak.checkpoints._errors import CheckpointError
from polyak.checkpoints._hf import find_weights
from polyak.checkpoints._torchzip import TorchCheckpoint
from polyak.safetensors import Checkpoint
from polyak.safetensors._format import Closing
from polyak.safetensors._reader import open_regular

__all__ = ["detect", "open_checkpoint", "ShardedCheckpoint"]

_LEGACY = (
    "{path}: a torch.save file in the legacy (pre-1.6, non-zip) format, which polyak cannot "
    "stream; re-save it in the zip format: torch.save(torch.load(path), path)"
)


def _detect_file(path: str) -> str:
    fd, st = open_regular(path, "checkpoint file")  # a FIFO would block a plain open()
    with open(fd, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise CheckpointError(_LEGACY.format(path=path))
    if len(head) > 262 and head[257:262] == b"ustar":
        raise CheckpointError(_LEGACY.format(path=path))
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= st.st_size - 8 and head[8:9] == b"{":
            return "safetensors"
    if path.endswith(".safetensors"):
        return "safetensors"  # malformed: the safetensors reader says precisely how
    raise CheckpointError(
        f"{path}: not a checkpoint polyak can read (expected a safetensors file or a "
        "torch.save zip file; the content matches neither)"
    )


def detect(path: str | os.PathLike[str]) -> str:
    """The kind of checkpoint at ``path``, from its content, not only its name.

    Returns:
        ``"safetensors"`` (a file, or a folder of shards with an index and no model config),
        ``"torch"`` (a ``torch.save`` zip file, whatever its extension), ``"huggingface"``
        (a model folder from ``save_pretrained`` or a Trainer ``checkpoint-N/``) or
        ``"dcp"`` (a ``torch.distributed.checkpoint`` folder with ``.metadata``).

    Raises:
        CheckpointError: the path is missing, is a legacy (non-zip) ``torch.save`` file (the
            message says how to re-save it), or is none of the kinds above.

    Example:
        >>> import numpy as np, os, tempfile, polyak.safetensors as pst
        >>> p = os.path.join(tempfile.mkdtemp(), "weights.bin")  # the name says nothing
        >>> pst.save({"w": np.ones(2, np.float32)}, p + ".safetensors")
        >>> os.rename(p + ".safetensors", p)
        >>> detect(p)
        'safetensors'
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        return _detect_file(path)
    names = set(os.listdir(path))
    if ".metadata" in names:
        return "dcp"
    if "config.json" in names or names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        return "huggingface"
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return "safetensors"
    raise CheckpointError(
        f"{path}: a folder with no checkpoint in it (no .safetensors files or index, no "
        "pytorch_model.bin, no DCP .metadata)"
    )


class ShardedCheckpoint(Closing):
    """Several readers seen as one (a sharded ``pytorch_model-*.bin`` set).

    Raises:
        CheckpointError: a tensor name is in two parts.

    Example:
        >>> import numpy as np, os, tempfile
        >>> import polyak.safetensors as pst
        >>> from polyak.checkpoints import ShardedCheckpoint
        >>> d = tempfile.mkdtemp()
        >>> pst.save({"a": np.ones(2, np.float32)}, os.path.join(d, "1.safetensors"))
        >>> pst.save({"b": np.zeros(3, np.float32)}, os.path.join(d, "2.safetensors"))
        >>> parts = [pst.Checkpoint(os.path.join(d, f"{i}.safetensors")) for i in (1, 2)]
        >>> with ShardedCheckpoint(d, parts) as ckpt:
        ...     sorted(ckpt.keys()), ckpt.info("b")
        (['a', 'b'], (dtype('float32'), (3,)))
    """

    def __init__(self, path: str, parts: list[Any]) -> None:
        self.path = path
        self.parts = parts
        self.metadata = None
        self._where: dict[str, Any] = {}
        for part in parts:
            for name in part.keys():
                if name in self._where:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} is in both {self._where[name].path} and "
                        f"{part.path}"
                    )
                self._where[name] = part

    def keys(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        return self._where[name].info(name)

    def read(self, name: str, elem_start: int, out: np.ndarray) -> None:
        self._where[name].read(name, elem_start, out)

    def read_tensor(self, name: str) -> np.ndarray:
        return self._where[name].read_tensor(name)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def identities(self) -> set[tuple[int, int]]:
        return set().union(*(p.identities() for p in self.parts))

    def changed(self) -> str | None:
        """Which shard changed since it was opened, and how; or None."""
        return next((c for c in (p.changed() for p in self.parts) if c is not None), None)

    def close(self) -> None:
        for p in self.parts:
            p.close()


def _open_torch_files(path: str, files: list[str], key: str | None) -> Any:
    parts: list[Any] = []
    try:
        for f in files:
            parts.append(TorchCheckpoint(f, key=key))
    except BaseException:
        for p in parts:
            p.close()
        raise
    return parts[0] if len(parts) == 1 else ShardedCheckpoint(path, parts)


def open_checkpoint(path: str | os.PathLike[str], *, key: str | None = None) -> Any:
    """Open any checkpoint kind as a reader of the stream core (``keys``, ``info``, ``read``).

    Args:
        path: a safetensors file or sharded folder, a torch zip file, a Hugging Face model
            folder or a DCP folder (see :func:`detect`).
        key: the weights inside a nested torch or DCP checkpoint (``"state_dict"``).

    Returns:
        A reader with ``keys()``, ``info(name)``, ``read(name, elem_start, out)``,
        ``read_tensor(name)``, ``nbytes``, ``metadata`` and ``close()``; use it as a context
        manager.

    Raises:
        CheckpointError: see :func:`detect` and the readers; ``key`` given for a safetensors
            checkpoint, which is always a flat mapping.
        UnsafeCheckpointError: a torch pickle references anything outside the allow-list.
        KeyChoiceError: the weights of a nested checkpoint are not at ``key``.

    Example:
        >>> import torch, os, tempfile
        >>> p = os.path.join(tempfile.mkdtemp(), "model.pth.tar")
        >>> torch.save({"model": {"w": torch.ones(3)}}, p)
        >>> with open_checkpoint(p, key="model") as ck:
        ...     ck.keys(), ck.info("w")
        (['w'], (dtype('float32'), (3,)))
    """
    path = os.fspath(path)
    kind = detect(path)
    if kind == "dcp":
        return DCPCheckpoint(path, key=key)
    if kind == "torch":
        return TorchCheckpoint(path, key=key)
    if kind == "huggingface":
        fmt, files = find_weights(path)
        if fmt == "torch":
            return _open_torch_files(path, files, key)
        path = files[0] if files[0].endswith(".safetensors") else path
    if key is not None:
        raise CheckpointError(
            f"{path}: key={key!r} given, but a safetensors checkpoint is a flat mapping of "
            "tensors; key applies to torch and DCP checkpoints"
        )
    return Checkpoint(path)
