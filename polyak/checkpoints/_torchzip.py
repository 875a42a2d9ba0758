"""Reading ``torch.save`` zip checkpoints tensor by tensor, without torch.

Hand-written because no library streams torch zip members: ``torch.load`` builds every tensor
(and with ``mmap=True`` maps the whole file, whose pages then count as resident as they are
read), and safetensors reads only its own format. The layout is simple: a zip archive, written
uncompressed, holding ``<archive>/data.pkl`` (the object, with tensors as references to
storages), ``<archive>/data/<key>`` (each storage's raw bytes) and ``<archive>/byteorder``.
``zipfile`` gives each member's offset; the data is read with ``pread`` into the caller's
buffers, exactly as the safetensors reader does, so memory stays bounded.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from polyak.checkpoints._errors import CheckpointError
from polyak.checkpoints._identity import Fingerprints
from polyak.checkpoints._nested import candidate_keys, select
from polyak.checkpoints._table import TensorTable
from polyak.checkpoints._unpickle import TORCH_DTYPES, TensorRef, load_pickle
from polyak.safetensors._format import FdReader, pread_into
from polyak.safetensors._reader import open_regular

__all__ = ["TorchCheckpoint", "MAX_PICKLE_BYTES"]

# data.pkl holds only the object's skeleton (names, shapes); a large one is not a state dict.
MAX_PICKLE_BYTES = 256 << 20

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _is_tensor(x: Any) -> bool:
    return isinstance(x, TensorRef)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride)):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


class TorchCheckpoint(TensorTable, FdReader):
    """A ``torch.save`` zip checkpoint (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``).

    Implements the reader protocol of :mod:`polyak._stream` (``keys``, ``info``, ``read``).
    Only the pickle (names, shapes, dtypes) is read up front, with a restricted unpickler that
    runs nothing from the file; tensor data is read on demand. torch is not needed.

    Args:
        path: the checkpoint file.
        key: dotted key of the weights inside a nested checkpoint (``"state_dict"``); None
            when the top level is the mapping of names to tensors.

    Raises:
        CheckpointError: not a torch zip file, compressed members, big-endian data, a
            non-contiguous tensor, or a tensor that does not fit its storage.
        UnsafeCheckpointError: the pickle references anything outside the tensor allow-list.
        KeyChoiceError: the weights are not at ``key``; the message lists the keys that hold
            tensor mappings.

    Example:
        >>> import torch, tempfile, os, numpy as np
        >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"state_dict": {"w": torch.arange(4.0)}, "epoch": 3}, p)
        >>> with TorchCheckpoint(p, key="state_dict") as ck:
        ...     out = np.empty(2, np.float32)
        ...     ck.read("w", 2, out)
        ...     ck.keys(), out
        (['w'], array([2., 3.], dtype=float32))
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.metadata: Mapping[str, str] | None = None
        try:
            self._fd, st = open_regular(self.path, "checkpoint file")
            self.identity = (st.st_dev, st.st_ino)
            self._fingerprints = Fingerprints([self.path])
            obj = self._open_zip()
            self.candidates = candidate_keys(obj, _is_tensor)
            tensors = select(obj, key, self.path, _is_tensor)
            self._tensors = {name: self._locate(name, ref) for name, ref in tensors.items()}
        except BaseException:
            self.close()
            raise

    def _open_zip(self) -> Any:
        try:
            with open(self._fd, "rb", closefd=False) as f, zipfile.ZipFile(f) as zf:
                members = {info.filename: info for info in zf.infolist()}
                pkl = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
                if len(pkl) != 1:
                    raise CheckpointError(
                        f"{self.path}: a zip file but not a torch checkpoint "
                        f"({len(pkl)} data.pkl members)"
                    )
                self._prefix = pkl[0][: -len("data.pkl")]
                if members[pkl[0]].file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(
                        f"{self.path}: data.pkl of {members[pkl[0]].file_size} bytes exceeds "
                        f"the {MAX_PICKLE_BYTES}-byte limit"
                    )
                order = members.get(self._prefix + "byteorder")
                if order is not None and zf.read(order).strip() != b"little":
                    raise CheckpointError(
                        f"{self.path}: saved on a big-endian machine "
                        f"(byteorder {zf.read(order).strip().decode(errors='replace')!r}); "
                        "only little-endian torch checkpoints are supported"
                    )
                data = zf.read(pkl[0])
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"{self.path}: not a readable zip file ({e})") from None
        self._members = members
        return load_pickle(data, self.path)

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{self.path}: member {info.filename} is compressed; torch writes storages "
                "uncompressed (was the file re-zipped?)"
            )
        head = bytearray(_LOCAL_HEADER.size)
        pread_into(self._fd, memoryview(head), info.header_offset, self.path)
        magic, name_len, extra_len = _LOCAL_HEADER.unpack(head)
        if magic != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: bad zip local header for {info.filename}")
        return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len

    def _locate(self, name: str, ref: TensorRef) -> tuple[np.dtype, tuple[int, ...], int]:
        where = f"{self.path}: tensor {name!r}"
        dtype = TORCH_DTYPES.get(ref.dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{where}: torch dtype {ref.dtype_name} has no numpy equivalent "
                f"(supported: {', '.join(TORCH_DTYPES)})"
            )
        shape, stride, offset = ref.shape, ref.stride, ref.offset
        ints = all(isinstance(v, int) and v >= 0 for v in (*shape, *stride, offset))
        if not ints or len(shape) != len(stride):
            raise CheckpointError(f"{where}: malformed shape {shape!r:.60}, stride {stride!r:.60}")
        size = math.prod(shape)
        if size and not _contiguous(shape, stride):
            raise CheckpointError(
                f"{where}: stored non-contiguous (shape {list(shape)}, stride {list(stride)}); "
                "re-save it with .contiguous()"
            )
        info = self._members.get(f"{self._prefix}data/{ref.storage.key}")
        if info is None:
            raise CheckpointError(f"{where}: storage {ref.storage.key!r} missing from the zip")
        if (offset + size) * dtype.itemsize > info.file_size:
            raise CheckpointError(
                f"{where}: elements [{offset}, {offset + size}) run past its storage of "
                f"{info.file_size} bytes"
            )
        start = self._data_start(info) + offset * dtype.itemsize
        return dtype, tuple(shape), start

    # -- reader protocol -------------------------------------------------------------------
    def read(self, name: str, elem_start: int, out: np.ndarray) -> None:
        """Fill the C-contiguous ``out`` with elements ``elem_start...`` of tensor ``name``."""
        dtype, shape, start = self._tensors[name]
        if out.dtype.itemsize != dtype.itemsize or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous with {dtype.itemsize}-byte items")
        if elem_start < 0 or elem_start + out.size > math.prod(shape):
            raise ValueError(f"elements [{elem_start}, {elem_start + out.size}) outside {name!r}")
        raw = out.reshape(-1).view(np.uint8)
        pread_into(self._fd, memoryview(raw), start + elem_start * dtype.itemsize, self.path)

    # -- extras ----------------------------------------------------------------------------
    def identities(self) -> set[tuple[int, int]]:
        return {self.identity}

    def changed(self) -> str | None:
        """How the file changed since it was opened, or None (checked before an output is
        committed, so that an average never mixes two versions of an input)."""
        return self._fingerprints.changed()
