"""Reading safetensors checkpoints (a file or a sharded directory) slice by slice.

Data is read with ``os.preadv`` into buffers the caller owns, never by mapping the whole file:
mapped pages count towards the resident set, and the merge must keep it bounded whatever the
model's size. ``preadv`` takes an explicit offset, so threads can share one descriptor.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from polyak.safetensors._errors import CheckpointError, HeaderError
from polyak.safetensors._format import (
    MAX_HEADER_BYTES,
    PACKED,
    Closing,
    FdReader,
    TensorInfo,
    lone_surrogate,
    parse_header,
    pread_into,
    unpack_f4,
)

__all__ = [
    "SafetensorsFile",
    "Checkpoint",
    "find_index",
    "read_index",
    "read_bounded",
    "open_regular",
    "fingerprint",
]

_INDEX_SUFFIX = ".safetensors.index.json"


def _raise_open_file_limit() -> bool:
    """Raise the soft limit on open files up to the hard one; whether it went up.

    A merge keeps every input open; the usual soft limit (1024) is far below the usual hard
    limit, which an unprivileged process may raise itself.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return False
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft >= target:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return False
    return True


def _too_many_open(path: str) -> CheckpointError:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limits = f" (the limit is {soft} open files, hard limit {hard})"
    except ImportError:
        limits = ""
    return CheckpointError(
        f"{path}: cannot open: too many open files{limits}; a merge keeps every input file "
        "open, so raise the limit (ulimit -n) or merge fewer checkpoints at a time"
    )


def open_regular(path: str, what: str = "file") -> tuple[int, os.stat_result]:
    """Open ``path`` read-only, making sure it is a regular file; (fd, its stat).

    The file is opened non-blocking first: opening a FIFO for reading would otherwise wait
    forever for a writer. Devices (``/dev/zero``), FIFOs and sockets are refused, so every
    later read is bounded by the file's size.

    Raises:
        CheckpointError: missing, not a regular file, or not openable (the message says why,
            and which limit to raise when there are too many open files).
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    for attempt in range(2):
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path}: is a directory, expected a {what}") from None
        except OSError as e:
            if e.errno == errno.EMFILE and attempt == 0 and _raise_open_file_limit():
                continue
            if e.errno == errno.EMFILE:
                raise _too_many_open(path) from None
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise CheckpointError(f"{path}: is {kind}, not a regular {what}")
    return fd, st


def fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns) of a file: it changes when the file is replaced,
    truncated, extended or written to."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SafetensorsFile(FdReader):
    """One open safetensors file with a validated header.

    Raises:
        CheckpointError: the path is missing or not a regular file.
        HeaderError: the header is malformed (naming the file and the tensor).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = -1
        self._fd, st = open_regular(self.path, "safetensors file")
        try:
            self.identity = (st.st_dev, st.st_ino)
            self.fingerprint = fingerprint(st)
            self.file_size = st.st_size
            self.header = parse_header(self._fd, self.path, st.st_size)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            self.close()
            raise

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> Mapping[str, str] | None:
        return self.header.metadata

    def changed(self) -> str | None:
        """How the file changed since it was opened (replaced, resized, rewritten), or None."""
        try:
            now = fingerprint(os.stat(self.path))
        except OSError as e:
            return f"it can no longer be found ({e.strerror})"
        if now[:2] != self.fingerprint[:2]:
            return "it was replaced by another file"
        if now[2] != self.fingerprint[2]:
            return f"its size changed from {self.fingerprint[2]} to {now[2]} bytes"
        if now[3] != self.fingerprint[3]:
            return "it was modified (its modification time changed)"
        return None

    def read(self, info: TensorInfo, elem_start: int, out: np.ndarray) -> None:
        """Fill the C-contiguous ``out`` with elements ``elem_start...`` of tensor ``info``."""
        item = info.dtype.itemsize
        if out.dtype.itemsize != item or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous with {item}-byte items")
        if elem_start < 0 or elem_start + out.size > info.size:
            raise ValueError(
                f"elements [{elem_start}, {elem_start + out.size}) outside tensor "
                f"{info.name!r} of {info.size} elements"
            )
        if info.code in PACKED:
            # Whole bytes around the wanted values, unpacked, then the values cut out.
            first, stop = elem_start // 2, (elem_start + out.size + 1) // 2
            packed = np.empty(stop - first, np.uint8)
            pread_into(self._fd, memoryview(packed), info.start + first, self.path)
            values = np.empty(2 * packed.size, info.dtype)
            unpack_f4(packed, values)
            skip = elem_start - 2 * first
            out.reshape(-1)[...] = values[skip : skip + out.size]
            return
        raw = out.reshape(-1).view(np.uint8)
        pread_into(self._fd, memoryview(raw), info.start + elem_start * item, self.path)


def find_index(directory: str) -> str | None:
    """The ``*.safetensors.index.json`` of a sharded checkpoint directory, if any."""
    preferred = os.path.join(directory, "model" + _INDEX_SUFFIX)
    if os.path.lexists(preferred):
        return preferred
    found = sorted(n for n in os.listdir(directory) if n.endswith(_INDEX_SUFFIX))
    if len(found) > 1:
        raise CheckpointError(
            f"{directory}: several shard indexes ({', '.join(found)}); pass one checkpoint"
        )
    return os.path.join(directory, found[0]) if found else None


def read_bounded(path: str, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refusing one over ``limit`` bytes.

    The read is bounded by the size the file has when opened (a FIFO or ``/dev/zero`` is
    refused by :func:`open_regular`), so it can neither hang nor exhaust memory.
    """
    fd, st = open_regular(path, what)
    try:
        if st.st_size > limit:
            raise HeaderError(f"{path}: {what} of {st.st_size} bytes exceeds the size limit")
        data = bytearray(st.st_size)
        pread_into(fd, memoryview(data), 0, path)
        return bytes(data)
    finally:
        os.close(fd)


def _bad_shard_name(shard: Any) -> bool:
    return (
        not isinstance(shard, str)
        or not shard.endswith(".safetensors")
        or os.path.basename(shard) != shard
        or shard in (".", "..")
        or "\0" in shard
        or lone_surrogate(shard)
    )


def read_index(index_path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight_map, metadata) of a shard index, validated (names are plain shard file names).

    Raises:
        CheckpointError: the index is not a regular file.
        HeaderError: the index is too large, not JSON, or names an unusable shard.
    """
    data = read_bounded(index_path, MAX_HEADER_BYTES, "shard index")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"{index_path}: not a valid JSON shard index ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise HeaderError(f"{index_path}: shard index needs a 'weight_map' object")
    weight_map = obj["weight_map"]
    for name, shard in weight_map.items():
        if _bad_shard_name(shard):
            shown = shard.encode("utf-8", "backslashreplace") if isinstance(shard, str) else shard
            raise HeaderError(
                f"{index_path}: tensor {name!r} maps to {shown!r}; shards must be plain "
                "'*.safetensors' file names in the same directory (no NUL, valid Unicode)"
            )
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        raise HeaderError(f"{index_path}: 'metadata' must be an object")
    return weight_map, meta


class Checkpoint(Closing):
    """A safetensors checkpoint: one file, or a directory of shards with an index.

    Implements the reader protocol of :mod:`polyak._stream` (``keys``, ``info``, ``read``,
    ``metadata``). Tensors are listed shard by shard, in file order within each shard.

    Args:
        path: a ``.safetensors`` file, or a directory holding ``*.safetensors.index.json`` and
            its shards (or a single ``.safetensors`` file).

    Raises:
        CheckpointError: the path does not exist or is not a checkpoint.
        HeaderError: a header or the index is malformed or inconsistent.

    Example:
        >>> import numpy as np, os, tempfile
        >>> from polyak.safetensors import save
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save({"w": np.arange(10, dtype=np.float32)}, p)
        >>> with Checkpoint(p) as ck:
        ...     part = np.empty(3, np.float32)
        ...     ck.read("w", 4, part)  # elements 4, 5, 6, straight from the file
        ...     ck.info("w"), part
        ((dtype('float32'), (10,)), array([4., 5., 6.], dtype=float32))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.index_path: str | None = None
        self.index_metadata: dict[str, Any] = {}
        self.files: list[SafetensorsFile] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        # Names are unique across shards: _open checked that each shard holds only the
        # tensors the index maps to it, and the index maps each name to one shard. One small
        # int per name (not per-tensor objects): a merge holds this for every input.
        self._shard_of: dict[str, int] | None = None
        if len(self.files) > 1:
            self._shard_of = {name: k for k, f in enumerate(self.files) for name in f.tensors}

    def _locate(self, name: str) -> tuple[SafetensorsFile, TensorInfo]:
        f = self.files[self._shard_of[name] if self._shard_of is not None else 0]
        return f, f.tensors[name]

    def _open(self) -> None:
        if not os.path.exists(self.path):
            raise CheckpointError(f"{self.path}: no such file or directory")
        if not os.path.isdir(self.path):
            self.files.append(SafetensorsFile(self.path))
            return
        self.index_path = find_index(self.path)
        if self.index_path is None:
            single = sorted(n for n in os.listdir(self.path) if n.endswith(".safetensors"))
            if len(single) != 1:
                raise CheckpointError(
                    f"{self.path}: directory has no '*{_INDEX_SUFFIX}' and "
                    f"{len(single)} .safetensors files; expected a sharded checkpoint"
                )
            self.files.append(SafetensorsFile(os.path.join(self.path, single[0])))
            return
        weight_map, self.index_metadata = read_index(self.index_path)
        if not weight_map:
            raise HeaderError(f"{self.index_path}: empty weight_map")
        for shard in sorted(set(weight_map.values())):
            self.files.append(SafetensorsFile(os.path.join(self.path, shard)))
        for f in self.files:
            shard = os.path.basename(f.path)
            for name in f.tensors:
                if weight_map.get(name) != shard:
                    raise HeaderError(
                        f"{f.path}: tensor {name!r} is not mapped to this shard in "
                        f"{os.path.basename(self.index_path)}"
                    )
        present = {name for f in self.files for name in f.tensors}
        missing = sorted(set(weight_map) - present)
        if missing:
            raise HeaderError(
                f"{self.index_path}: {len(missing)} tensor(s) of the weight_map are in no shard: "
                f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}"
            )

    # -- reader protocol -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [name for f in self.files for name in f.tensors]

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        info = self._locate(name)[1]
        return info.dtype, info.shape

    def read(self, name: str, elem_start: int, out: np.ndarray) -> None:
        f, info = self._locate(name)
        f.read(info, elem_start, out)

    @property
    def metadata(self) -> Mapping[str, str] | None:
        return self.files[0].metadata

    # -- extras ----------------------------------------------------------------------------
    def tensor_info(self, name: str) -> TensorInfo:
        return self._locate(name)[1]

    def read_tensor(self, name: str) -> np.ndarray:
        """A new array holding the whole tensor ``name``."""
        f, info = self._locate(name)
        out = np.empty(info.shape, info.dtype)
        f.read(info, 0, out)
        return out

    def layout(self) -> list[tuple[str, list[str]]]:
        """(shard file name, tensor names) per file, in order."""
        return [(os.path.basename(f.path), list(f.tensors)) for f in self.files]

    @property
    def sharded(self) -> bool:
        return self.index_path is not None

    @property
    def nbytes(self) -> int:
        return sum(f.file_size - f.header.data_start for f in self.files)

    def identities(self) -> set[tuple[int, int]]:
        return {f.identity for f in self.files}

    def changed(self) -> str | None:
        """Which file of the checkpoint changed since it was opened, and how; or None."""
        for f in self.files:
            problem = f.changed()
            if problem is not None:
                return f"{f.path}: {problem}"
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    def close(self) -> None:
        for f in self.files:
            f.close()
