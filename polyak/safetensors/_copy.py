"""Extra files (a model's config and tokenizer) written into a folder output with its weights.

They are copied into unnamed temporary files when the writer is made, before any tensor is
averaged, flushed with the shards and renamed after them: a merge that fails leaves neither
the weights nor the copied files behind, and a folder never holds a config without weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from polyak.safetensors._errors import OutputError, OutputWriteError
from polyak.safetensors._writer import AtomicFile, CheckpointWriter, check_not_input

__all__ = ["WithFiles"]

_COPY_CHUNK = 1 << 20


class WithFiles:
    """A :class:`CheckpointWriter` for a directory, plus files copied into that directory.

    Args:
        writer: the directory output's writer (it created the folder if needed).
        files: ``(source path, path relative to the output folder)`` pairs.
        protect: (st_dev, st_ino) of files that must not be overwritten (the inputs).

    Raises:
        OutputError: a destination is an input or a source itself, or a source is unreadable.
        OutputWriteError: the file system refused a write (everything is removed).
    """

    def __init__(
        self,
        writer: CheckpointWriter,
        files: Sequence[tuple[str, str]],
        *,
        protect: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.inner = writer
        self.path = writer.path
        self._copies: list[AtomicFile] = []
        self._dirs: list[str] = []  # subfolders made here, removed again on abort
        protect = set(protect)
        try:
            for src, rel in files:
                self._copies.append(self._copy(src, os.path.join(self.path, rel), protect))
        except BaseException:
            self.abort()
            raise

    def _copy(self, src: str, dest: str, protect: set[tuple[int, int]]) -> AtomicFile:
        try:
            st = os.stat(src)
        except OSError as e:
            raise OutputError(f"cannot copy {src}: {e.strerror}") from None
        check_not_input(dest, protect | {(st.st_dev, st.st_ino)})
        self._makedirs(os.path.dirname(dest))
        out = AtomicFile(dest, st.st_size)
        try:
            with open(src, "rb") as f:
                offset = 0
                while chunk := f.read(_COPY_CHUNK):
                    out.pwrite(np.frombuffer(chunk, np.uint8), offset)
                    offset += len(chunk)
        except OSError as e:
            out.abort()
            if isinstance(e, OutputWriteError):
                raise
            raise OutputError(f"cannot copy {src}: {e.strerror}") from None
        except BaseException:
            out.abort()
            raise
        return out

    def _makedirs(self, folder: str) -> None:
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except OSError as e:
                raise OutputError(f"cannot create folder {d}: {e.strerror}") from None
            self._dirs.append(d)

    @property
    def files(self) -> list[str]:
        """The weight files and index, then the copied files."""
        return self.inner.files + [f.path for f in self._copies]

    def write(self, name: str, elem_start: int, array: np.ndarray) -> None:
        self.inner.write(name, elem_start, array)

    def sync(self) -> None:
        """Flush the weights and the copies to disk; removes everything on failure."""
        try:
            self.inner.sync()
            for f in self._copies:
                f.sync()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """Give the weights, then the copies, their final names (all flushed before)."""
        try:
            for f in self._copies:
                f.sync()
            self.inner.commit()
            for f in self._copies:
                f.commit()
        except BaseException:
            self.abort()
            raise
        self._dirs = []

    def abort(self) -> None:
        """Remove the copies, the subfolders made for them and what the writer wrote."""
        for f in self._copies:
            f.abort()
        for d in reversed(self._dirs):
            try:
                os.rmdir(d)  # only if empty: it never removes anything else
            except OSError:
                pass
        self._dirs = []
        self.inner.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (nbytes, paths, single) is the weights writer's.
        return getattr(self.inner, name)
