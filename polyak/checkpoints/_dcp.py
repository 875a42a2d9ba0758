"""Reading ``torch.distributed.checkpoint`` (DCP) folders one tensor at a time.

DCP stores each tensor as chunks spread over ``*.distcp`` files, described by ``.metadata``;
only DCP's own reader knows how to reassemble them, so this adapter asks it for one whole
tensor at a time (``torch.distributed.checkpoint.load`` into a preallocated tensor, in a
single process) and serves slices of it to the stream. A tensor is dropped as soon as all of
its elements have been read, so memory is bounded by the tensors in flight (one per input
with one thread), not by the checkpoint.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

from polyak import _backend
from polyak.checkpoints._errors import CheckpointError, KeyChoiceError
from polyak.checkpoints._identity import Fingerprints
from polyak.checkpoints._table import TensorTable
from polyak.checkpoints._unpickle import TORCH_DTYPES

__all__ = ["DCPCheckpoint", "torch_to_numpy"]


def torch_to_numpy(t: Any) -> np.ndarray:
    """The numpy view of a CPU torch tensor of any dtype in ``TORCH_DTYPES`` (bits shared)."""
    return _backend.get(t).to_numpy(t)


def _prefixes(names: list[str], is_tensor: dict[str, bool]) -> list[str]:
    """Leading dotted prefixes under which every entry is a tensor."""
    found = []
    for depth in (1, 2):
        groups: dict[str, list[str]] = {}
        for n in names:
            parts = n.split(".")
            if len(parts) > depth:
                groups.setdefault(".".join(parts[:depth]), []).append(n)
        found += [p for p, ns in groups.items() if all(is_tensor[n] for n in ns)]
        if found:
            break
    return found


class DCPCheckpoint(TensorTable):
    """A ``torch.distributed.checkpoint`` folder, read through DCP's ``FileSystemReader``.

    Implements the reader protocol of :mod:`polyak._stream`. Needs torch.

    Args:
        path: the folder holding ``.metadata`` and ``*.distcp`` files.
        key: dotted prefix of the weights (``"model"`` for ``{"model": state_dict, ...}``),
            stripped from the names; None when every entry is a tensor.

    Raises:
        CheckpointError: torch is missing, or the metadata cannot be read.
        KeyChoiceError: non-tensor entries without a key, or nothing under ``key``; the
            message lists the prefixes that hold only tensors.

    Example:
        >>> import tempfile, warnings, torch
        >>> import torch.distributed.checkpoint as dcp
        >>> from polyak.checkpoints import DCPCheckpoint
        >>> d = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():  # one process, no process group: DCP says so
        ...     warnings.simplefilter("ignore")
        ...     _ = dcp.save({"model": {"w": torch.arange(3.0)}, "step": 5}, checkpoint_id=d)
        >>> with DCPCheckpoint(d, key="model") as ckpt:
        ...     ckpt.keys(), ckpt.read_tensor("w")
        (['w'], array([0., 1., 2.], dtype=float32))
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.metadata = None
        try:
            import torch
            from torch.distributed.checkpoint import FileSystemReader
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        except ImportError:
            raise CheckpointError(
                f"{self.path}: reading a DCP checkpoint needs torch (pip install torch)"
            ) from None
        self._torch = torch
        self._reader_cls = FileSystemReader
        try:
            md = FileSystemReader(self.path).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read DCP metadata ({e})") from None
        entries = md.state_dict_metadata
        tensor = {n: isinstance(m, TensorStorageMetadata) for n, m in entries.items()}
        names = list(entries)
        self.candidates = _prefixes(names, tensor)
        if key is not None:
            names = [n for n in names if n.startswith(key + ".")]
        bad = sorted(n for n in names if not tensor[n])
        if bad or not names:
            what = f"non-tensor entries {', '.join(map(repr, bad[:10]))}" if bad else "no entries"
            hint = ", ".join(self.candidates) or "none"
            raise KeyChoiceError(
                f"{self.path}: {'key ' + repr(key) if key else 'the checkpoint'} has {what}; "
                f"prefixes holding only tensors: {hint}"
                + (f"; pass --key {self.candidates[0]}" if self.candidates else ""),
                self.candidates,
            )
        strip = len(key) + 1 if key is not None else 0
        self._fqn: dict[str, str] = {}
        self._tensors: dict[str, tuple[np.dtype, tuple[int, ...], Any]] = {}
        for fqn in names:
            m = entries[fqn]
            tname = str(m.properties.dtype).removeprefix("torch.")
            dtype = TORCH_DTYPES.get(tname)
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {fqn!r}: unsupported dtype {tname}")
            self._fqn[fqn[strip:]] = fqn
            self._tensors[fqn[strip:]] = (dtype, tuple(m.size), m.properties.dtype)
        self._fingerprints = Fingerprints(
            [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))
             if os.path.isfile(os.path.join(self.path, f))]
        )  # fmt: skip
        self._lock = threading.Lock()
        self._loaded: dict[str, tuple[threading.Event, list]] = {}

    def _load(self, name: str) -> np.ndarray:
        dtype, shape, tdtype = self._tensors[name]
        t = self._torch.empty(shape, dtype=tdtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            from torch.distributed.checkpoint import load

            load({self._fqn[name]: t}, storage_reader=self._reader_cls(self.path))
        return torch_to_numpy(t)

    def _acquire(self, name: str) -> list:
        # One load per tensor even when several threads ask for its slices at once.
        with self._lock:
            entry = self._loaded.get(name)
            owner = entry is None
            if owner:
                entry = self._loaded[name] = (threading.Event(), [None, 0, None])
        event, slot = entry
        if owner:
            try:
                slot[0] = self._load(name)
            except Exception as e:
                slot[2] = CheckpointError(f"{self.path}: tensor {name!r}: DCP load failed ({e})")
            event.set()
        event.wait()
        if slot[2] is not None:
            raise slot[2]
        return slot

    # -- reader protocol -------------------------------------------------------------------
    def read(self, name: str, elem_start: int, out: np.ndarray) -> None:
        """Copy elements ``elem_start...`` of tensor ``name`` into ``out``."""
        slot = self._acquire(name)
        flat = slot[0].reshape(-1)
        out.reshape(-1)[...] = flat[elem_start : elem_start + out.size]
        with self._lock:
            slot[1] += out.size
            if slot[1] >= flat.size:  # every element served: drop the tensor
                self._loaded.pop(name, None)

    # -- extras ----------------------------------------------------------------------------
    def identities(self) -> set[tuple[int, int]]:
        return set()

    def changed(self) -> str | None:
        """Which file of the folder changed since it was opened, and how; or None."""
        return self._fingerprints.changed()

    def close(self) -> None:
        with self._lock:
            self._loaded.clear()
