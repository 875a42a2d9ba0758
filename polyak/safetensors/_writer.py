"""Atomic safetensors writing: a file (or a sharded directory) appears complete or not at all.

Data goes to an unnamed temporary file in the destination folder (Linux ``O_TMPFILE``; a
hidden named one elsewhere), is flushed and fsynced, and only then gets its final name with an
atomic rename. A crash, a kill or a full disk therefore never leaves a truncated file under the
output name; on an exception the temporary file is removed. Writes use ``os.pwrite`` at
explicit offsets so that several threads can fill one file.

What an output holds (its files, headers, index and copied model files) is planned once, by
:class:`OutputLayout`; the writer writes that plan and a dry run measures it.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyak.safetensors._errors import OutputError, OutputWriteError
from polyak.safetensors._format import PACKED, dtype_code, encode_header, pack_f4, storage_nbytes
from polyak.safetensors._transaction import (
    COPIED_KEY,
    INDEX_NAME,
    WRITER_MARK,
    FolderTransaction,
    OutputLock,
    fsync_dir,
    inspect_folder,
    on_fatal_signal,
    temp_path,
)

__all__ = [
    "AtomicFile",
    "SafetensorsWriter",
    "CheckpointWriter",
    "shard_names",
    "split_shards",
    "check_not_input",
    "check_output",
    "preflight",
    "OutputLayout",
    "encode",
]

_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file exceeds the file size limit (ulimit -f) or the filesystem's",
    errno.EDQUOT: "the disk quota is exceeded",
}


def _write_error(path: str, e: OSError) -> OutputWriteError:
    hint = _HINTS.get(e.errno or 0, e.strerror or str(e))
    return OutputWriteError(
        e.errno or errno.EIO,
        f"cannot write {path}: {hint} ({e.strerror}); nothing was written under that name",
        path,
    )


def check_not_input(path: str, protect: set[tuple[int, int]]) -> None:
    """Raise OutputError when ``path`` exists and is one of the protected (input) files."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if (st.st_dev, st.st_ino) in protect:
        raise OutputError(f"output {path} is one of the inputs; refusing to overwrite it")


_TMPFILE_OK: dict[int, bool] = {}

# Start writing dirty output pages back after this many bytes, so that the final fsync
# waits only for the tail instead of the whole file.
WRITEBACK_BYTES = 32 << 20


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes up front: a full disk or a size limit fails here, before any
    work, and writing into allocated blocks is faster than growing a sparse file."""
    if size == 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def _link_unnamed(fd: int, path: str) -> None:
    """Give the unnamed (O_TMPFILE) file open as ``fd`` the name ``path``.

    Needs ``linkat(AT_SYMLINK_FOLLOW)`` on ``/proc/self/fd/N``: a plain ``os.link`` calls
    ``link()``, which links the /proc symlink itself and fails with EXDEV. Passing a directory
    fd makes Python call ``linkat`` with the flag.
    """
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=dfd, follow_symlinks=True)
    finally:
        os.close(dfd)


def _tmpfile_works(directory: str) -> bool:
    """Whether unnamed files (O_TMPFILE) can be created in, and linked into, ``directory``.

    An unnamed temporary file vanishes with the process, so even a SIGKILL leaves nothing
    behind; but some file systems (and sandboxes) refuse to create or to link them, so probe
    once per device and fall back to a hidden named file.
    """
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return False
    dev = os.stat(directory).st_dev
    if dev not in _TMPFILE_OK:
        ok = False
        try:
            fd = os.open(
                directory, os.O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600
            )
        except OSError:
            fd = -1
        if fd >= 0:
            probe = os.path.join(directory, f".polyak-probe-{secrets.token_hex(4)}")
            try:
                _link_unnamed(fd, probe)
                os.unlink(probe)
                ok = True
            except OSError:
                pass
            finally:
                os.close(fd)
        _TMPFILE_OK[dev] = ok
    return _TMPFILE_OK[dev]


class AtomicFile:
    """A file written in place at offsets, visible under ``path`` only after :meth:`commit`.

    Raises:
        OutputWriteError: creating, sizing or writing the temporary file failed (it is removed).
    """

    def __init__(self, path: str, size: int) -> None:
        self.path = os.path.abspath(path)
        self.dir = os.path.dirname(self.path)
        self._tmp: str | None = None
        self._pending = 0
        self.fd = -1
        try:
            self.fd = self._create()
            _reserve(self.fd, size)
        except OSError as e:
            self.abort()
            raise _write_error(self.path, e) from None

    def _create(self) -> int:
        cloexec = getattr(os, "O_CLOEXEC", 0)
        if _tmpfile_works(self.dir):
            return os.open(self.dir, os.O_TMPFILE | os.O_WRONLY | cloexec, 0o666)
        for _ in range(100):
            name = temp_path(self.path)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | cloexec, 0o666)
            except FileExistsError:
                continue
            self._tmp = name
            return fd
        raise OSError(errno.EEXIST, "could not create a temporary file", self.dir)

    def pwrite(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        try:
            self._pending += view.nbytes
            while view.nbytes:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
            if self._pending > WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
                self._pending = 0
                # DONTNEED starts asynchronous writeback of the dirty pages (and drops the
                # ones already on disk); it does not wait, and the data stay in the file.
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise _write_error(self.path, e) from None

    def sync(self) -> None:
        """Flush the data to disk (where a full disk shows up at the latest)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.abort()
            raise _write_error(self.path, e) from None

    def commit(self) -> None:
        """fsync, then give the file its final name atomically (and fsync the folder)."""
        try:
            os.fsync(self.fd)
            if self._tmp is None:
                tmp = temp_path(self.path)
                _link_unnamed(self.fd, tmp)
                self._tmp = tmp
            os.replace(self._tmp, self.path)
            self._tmp = None
            os.close(self.fd)
            self.fd = -1
            fsync_dir(self.dir)
        except OSError as e:
            self.abort()
            raise _write_error(self.path, e) from None

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None


Entry = tuple[str, np.dtype, tuple[int, ...]]


def encode(
    entries: Sequence[Entry], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[int]]:
    """The header bytes and tensor offsets of a file holding ``entries`` (see encode_header)."""
    coded = [
        (name, dtype_code(dt, f"tensor {name!r}: "), tuple(shape)) for name, dt, shape in entries
    ]
    return encode_header(coded, metadata)


class SafetensorsWriter:
    """Writes one safetensors file: header first, tensor data at its offsets, atomically."""

    def __init__(
        self,
        path: str,
        entries: Sequence[Entry],
        metadata: Mapping[str, str] | None = None,
        *,
        encoded: tuple[bytes, list[int]] | None = None,
    ) -> None:
        self.path = path
        head, offsets = encoded if encoded is not None else encode(entries, metadata)
        self._where = {
            name: (off, np.dtype(dt).itemsize, math.prod(shape))
            for (name, dt, shape), off in zip(entries, offsets, strict=True)
        }
        self._packed = {name for name, dt, _ in entries if dtype_code(dt) in PACKED}
        self.nbytes = _data_nbytes(entries)
        self.size = len(head) + self.nbytes
        self._file = AtomicFile(path, self.size)
        try:
            self._file.pwrite(head, 0)
        except BaseException:
            self._file.abort()
            raise

    def write(self, name: str, elem_start: int, array: np.ndarray) -> None:
        off, item, size = self._where[name]
        flat = np.asarray(array).reshape(-1)  # copies only when not contiguous
        if flat.dtype.itemsize != item or elem_start < 0 or elem_start + flat.size > size:
            raise ValueError(f"bad write of {flat.size} elements at {elem_start} into {name!r}")
        if name in self._packed:
            # The stream writes spans of an even number of values (see _stream), so each
            # write covers whole bytes.
            if elem_start % 2 or (flat.size % 2 and elem_start + flat.size != size):
                raise ValueError(f"packed write of {flat.size} at {elem_start} into {name!r}")
            self._file.pwrite(pack_f4(flat), off + elem_start // 2)
            return
        self._file.pwrite(flat.view(np.uint8), off + elem_start * item)

    def sync(self) -> None:
        self._file.sync()

    def commit(self) -> None:
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()


def shard_names(count: int, stem: str = "model") -> list[str]:
    """Hugging Face shard names: ``model-00001-of-00003.safetensors``."""
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def split_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy split of ``entries`` (in order) into shards of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` gets a shard of its own.
    """
    shards: list[list[Entry]] = [[]]
    used = 0
    for entry in entries:
        nbytes = storage_nbytes(entry[1], math.prod(entry[2]))
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return shards


def _shard_plan(
    directory: str,
    entries: Sequence[Entry],
    layout: Sequence[tuple[str, Sequence[str]]] | None,
    max_shard_size: int | None,
) -> list[tuple[str, list[Entry]]]:
    """(shard path, its entries) for a sharded output: ``layout``, else split by size."""
    if layout is None:
        groups = split_shards(entries, max_shard_size) if max_shard_size else [list(entries)]
        names = shard_names(len(groups)) if len(groups) > 1 else ["model.safetensors"]
        layout = [(n, [e[0] for e in g]) for n, g in zip(names, groups, strict=True)]
    by_name = {e[0]: e for e in entries}
    return [(os.path.join(directory, n), [by_name[t] for t in ts]) for n, ts in layout]


def _data_nbytes(entries: Iterable[Entry]) -> int:
    """Bytes of the tensor data of ``entries`` (headers not included)."""
    return sum(storage_nbytes(dt, math.prod(shape)) for _, dt, shape in entries)


def _copy_error(src: str, e: OSError) -> OutputError:
    return OutputError(f"cannot copy {src}: {e.strerror}")


def _source_size(src: str) -> int:
    try:
        return os.path.getsize(src)
    except OSError as e:
        # A dry run fails where the merge's copy would, with the same message.
        raise _copy_error(src, e) from None


_Plan = tuple[tuple[str, tuple[Entry, ...]], ...]


@dataclass(frozen=True)
class OutputLayout:
    """One output as it will be written: its files, their headers, the index and the copied
    model files, planned without touching the file system.

    :class:`CheckpointWriter` writes exactly this plan and :meth:`nbytes` measures it, so the
    size a dry run announces (``MergePlan.bytes_to_write``) is the size the merge writes.

    Args:
        path: ``*.safetensors`` for one file, anything else for a sharded folder with
            ``model.safetensors.index.json``.
        entries: (name, dtype, shape) of every tensor, in the order to lay them out.
        metadata: ``__metadata__`` written in every file.
        shards: for a folder, ``(shard file name, tensor names)`` pairs; default: split by
            ``max_shard_size``, else one shard ``model.safetensors``.
        max_shard_size: largest shard in bytes (folders only).
        index_metadata: extra entries of the index's ``metadata`` (``total_size`` is set here).
        extra_files: for a folder, ``(source path, path relative to the folder)`` of files
            copied into it with the weights (a model's config and tokenizer files, for
            ``polyak.merge``). A file output has no folder to hold them: they are dropped.

    Example:
        >>> import numpy as np
        >>> entries = [(n, np.dtype(np.float32), (1000,)) for n in ("a", "b")]
        >>> out = OutputLayout("avg", entries, max_shard_size=4000)
        >>> [(os.path.basename(p), [e[0] for e in es]) for p, es in out.plan]
        [('model-00001-of-00002.safetensors', ['a']), ('model-00002-of-00002.safetensors', ['b'])]
        >>> out.nbytes()  # 8000 bytes of data, two headers and the index
        8327
        >>> import tempfile
        >>> cfg = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> with open(cfg, "w") as f:
        ...     f.write("{}")
        2
        >>> copies = [(cfg, "config.json")]
        >>> model = OutputLayout("avg", entries, max_shard_size=4000, extra_files=copies)
        >>> model.nbytes() - out.nbytes()  # the copy, and its name in the index
        52
    """

    path: str
    entries: Sequence[Entry]
    metadata: Mapping[str, str] | None = None
    shards: Sequence[tuple[str, Sequence[str]]] | None = None
    max_shard_size: int | None = None
    index_metadata: Mapping[str, Any] | None = None
    extra_files: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        # Normalised once here, so that the writer and the estimate read the same values.
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "entries", tuple(self.entries))
        extra = () if self.single else tuple(self.extra_files)
        object.__setattr__(self, "extra_files", extra)

    @property
    def single(self) -> bool:
        """Whether the output is one ``.safetensors`` file (else a folder)."""
        return self.path.endswith(".safetensors")

    @functools.cached_property
    def plan(self) -> _Plan:
        """(final path, entries) of every safetensors file of the output."""
        if self.single:
            return ((self.path, self.entries),)
        plan = _shard_plan(self.path, self.entries, self.shards, self.max_shard_size)
        return tuple((p, tuple(es)) for p, es in plan)

    def headers(self) -> list[tuple[bytes, list[int]]]:
        """Header bytes and tensor offsets of each file of :attr:`plan`.

        Raises:
            HeaderError: a header could not be read back (see :func:`encode`).
        """
        return [encode(es, self.metadata) for _, es in self.plan]

    @property
    def copied(self) -> list[str]:
        """The names the copied files take at the top of the folder (a file or a subfolder)."""
        return sorted({rel.split("/")[0] for _, rel in self.extra_files})

    def folder_names(self) -> list[str]:
        """Every name this output takes in its folder: shards, index, copies."""
        return [os.path.basename(p) for p, _ in self.plan] + [INDEX_NAME] + self.copied

    def index(self) -> bytes | None:
        """The bytes of ``model.safetensors.index.json`` (None for a file output)."""
        if self.single:
            return None
        meta = {k: v for k, v in (self.index_metadata or {}).items() if k != "total_size"}
        meta.pop(WRITER_MARK[0], None)
        meta.pop(COPIED_KEY, None)
        if self.copied:
            # The copied model files belong to this output: a later merge into the same
            # folder replaces them as it replaces the shards (see _transaction._previous_output).
            meta[COPIED_KEY] = self.copied
        weight_map = {t: os.path.basename(p) for p, es in self.plan for t, _, _ in es}
        index = {
            "metadata": {
                "total_size": _data_nbytes(self.entries),
                **meta,
                WRITER_MARK[0]: WRITER_MARK[1],
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        return (json.dumps(index, indent=2) + "\n").encode("utf-8")

    def nbytes(self) -> int:
        """Bytes the writer of this output writes: headers, tensor data, index and copies.

        Raises:
            OutputError: an extra file cannot be read (the copy would fail the same way).
            HeaderError: a header could not be written.
        """
        files = sum(
            len(head) + _data_nbytes(es)
            for (_, es), (head, _) in zip(self.plan, self.headers(), strict=True)
        )
        copies = sum(_source_size(src) for src, _ in self.extra_files)
        return files + len(self.index() or b"") + copies


def _copy_into(src: str, dest: str, protect: set[tuple[int, int]]) -> AtomicFile:
    """``src`` copied into the (still unnamed) file ``dest`` of a folder transaction."""
    try:
        st = os.stat(src)
        os.makedirs(os.path.dirname(dest), exist_ok=True)  # a subfolder of the staging folder
    except OSError as e:
        raise _copy_error(src, e) from None
    check_not_input(dest, protect | {(st.st_dev, st.st_ino)})
    out = AtomicFile(dest, st.st_size)
    try:
        with open(src, "rb") as f:
            offset = 0
            while chunk := f.read(1 << 20):
                out.pwrite(chunk, offset)
                offset += len(chunk)
    except OSError as e:
        out.abort()
        if isinstance(e, OutputWriteError):
            raise
        raise _copy_error(src, e) from None
    except BaseException:
        out.abort()
        raise
    return out


def check_output(layout: OutputLayout, protect: set[tuple[int, int]]) -> None:
    """The checks of an output that need no lock: a usable path that is not an input.

    Raises:
        OutputError: the path is unusable for the layout's kind, or names an input.
    """
    path = layout.path
    if layout.single:
        if os.path.isdir(path):
            raise OutputError(f"output {path} is a directory; expected a file name")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            problem = "is not a directory" if os.path.exists(parent) else "does not exist"
            raise OutputError(f"output folder {parent} {problem}")
    else:
        # normpath drops a trailing "/", through which a file would look absent.
        existing = os.path.normpath(path)
        if os.path.exists(existing) and not os.path.isdir(existing):
            raise OutputError(
                f"output {path} exists and is not a directory; name a directory for "
                "a sharded checkpoint or a '.safetensors' file"
            )
    for p, _ in layout.plan:
        check_not_input(p, protect)


def _check_drop(folder: str, drop: Iterable[str], protect: set[tuple[int, int]]) -> None:
    for name in drop:  # files the folder swap deletes: never an input
        check_not_input(os.path.join(folder, name), protect)


def preflight(layout: OutputLayout, protect: set[tuple[int, int]], *, force: bool) -> None:
    """Every refusal the writer of ``layout`` would meet, met now without locking or writing:
    what a dry run checks. The writer checks again under the lock (the folder may change).

    Raises:
        OutputError: as :class:`CheckpointWriter`, short of the lock and the disk.
    """
    check_output(layout, protect)
    if not layout.single:
        target = os.path.normpath(layout.path)
        drop, _ = inspect_folder(target, layout.folder_names(), force=force)
        _check_drop(target, drop, protect)


class CheckpointWriter:
    """The writer side of the streaming protocol: a single file or a sharded directory.

    The output is one transaction: it holds an exclusive lock on the output name for its
    whole life, and the file (or the whole folder: shards, index and copied files) appears
    under the final name in one atomic step at :meth:`commit`, or not at all (see
    :mod:`polyak.safetensors._transaction`).

    Args:
        layout: what to write: the files, their tensors, the index and the files to copy,
            exactly as :meth:`OutputLayout.nbytes` measures them.
        protect: (st_dev, st_ino) of files that must not be overwritten (the inputs).
        force: write into an existing folder that is not a previous polyak output (files with
            the output's names are replaced; no other file is ever deleted).

    Raises:
        OutputError: the output would overwrite a protected file, is locked by another
            writer, is a folder holding files polyak did not write (without ``force``), the
            path is unusable, or a file to copy cannot be read.
        HeaderError: a header could not be read back (over 100 MB, invalid shape or name).
        OutputWriteError: the file system refused the write (everything written is removed).
    """

    def __init__(
        self,
        layout: OutputLayout,
        *,
        protect: Iterable[tuple[int, int]] = (),
        force: bool = False,
    ) -> None:
        self.layout = layout
        self.path = layout.path
        self._copies: list[AtomicFile] = []
        self._writers: list[SafetensorsWriter] = []
        self._route: dict[str, SafetensorsWriter] = {}
        self._index: bytes | None = None
        self._folder: FolderTransaction | None = None
        self._lock: OutputLock | None = None
        check_output(layout, set(protect))
        try:
            # Encode every header first: one that cannot be written fails before any file.
            heads = layout.headers()
            self._index = layout.index()
            self._start(heads, force, set(protect))
        except BaseException:
            self.abort()
            raise
        self.nbytes = sum(w.size for w in self._writers)
        self.paths = [p for p, _ in layout.plan]

    def _start(
        self,
        heads: list[tuple[bytes, list[int]]],
        force: bool,
        protect: set[tuple[int, int]],
    ) -> None:
        """Take the lock, open the transaction, create the (still unnamed) files."""
        target = os.path.normpath(self.path)
        parent = os.path.dirname(os.path.abspath(target))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            blocker = parent
            while blocker and not os.path.lexists(blocker):
                blocker = os.path.dirname(blocker)
            why = f"{blocker} is a file" if os.path.isfile(blocker) else e.strerror
            raise OutputError(f"cannot create output directory {parent}: {why}") from None
        on_fatal_signal(id(self), self.abort)
        self._lock = OutputLock(target)
        if not self.layout.single:
            names = self.layout.folder_names()
            self._folder = FolderTransaction(target, names, force=force)
            _check_drop(target, self._folder.drop, protect)
            for src, rel in self.layout.extra_files:
                self._copies.append(_copy_into(src, self._folder.path(rel), protect))
        for (p, es), head in zip(self.layout.plan, heads, strict=True):
            where = p if self._folder is None else self._folder.path(os.path.basename(p))
            w = SafetensorsWriter(where, es, encoded=head)
            self._writers.append(w)
            for name, _, _ in es:
                self._route[name] = w

    @property
    def files(self) -> list[str]:
        """Every file this writer produces: the shards, the index (if any), the copies."""
        index = [os.path.join(self.path, INDEX_NAME)] if self._index is not None else []
        copies = [os.path.join(self.path, rel) for _, rel in self.layout.extra_files]
        return self.paths + index + copies

    def write(self, name: str, elem_start: int, array: np.ndarray) -> None:
        self._route[name].write(name, elem_start, array)

    def sync(self) -> None:
        """Flush every shard to disk (a late full disk fails here); removes all on failure."""
        try:
            for w in self._writers:
                w.sync()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """Make the file, or the whole folder (shards and index), appear under its name."""
        try:
            # Sync everything before naming anything, so a failure leaves no new file.
            self.sync()
            for w in self._writers:
                w.commit()
            for f in self._copies:
                f.commit()
            if self._folder is not None and self._index is not None:
                f = AtomicFile(self._folder.path(INDEX_NAME), len(self._index))
                try:
                    f.pwrite(self._index, 0)
                    f.commit()
                except BaseException:
                    f.abort()
                    raise
                try:
                    self._folder.commit()
                except OSError as e:
                    raise _write_error(self.path, e) from None
        except BaseException:
            self.abort()
            raise
        self._folder = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        on_fatal_signal(id(self), None)

    def abort(self) -> None:
        """Remove everything written so far; the output name keeps what it held."""
        for w in [*self._writers, *self._copies]:
            w.abort()
        if self._folder is not None:
            self._folder.abort()
            self._folder = None
        self._release()
