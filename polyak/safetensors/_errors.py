"""Errors of the safetensors adapter.

Bad input (a corrupt or hostile file, a bad argument) raises a
:class:`polyak.PolyakError` subclass naming the file, the tensor and the problem. Failures of
the machine while writing (a full disk, a file size limit) raise :class:`OutputWriteError`, an
:class:`OSError` that keeps its ``errno``, after removing everything half written.
"""

from __future__ import annotations

from polyak._errors import PolyakError

__all__ = ["HeaderError", "CheckpointError", "OutputError", "OutputWriteError"]


class HeaderError(PolyakError):
    """A safetensors header (or shard index) is malformed, truncated or inconsistent."""


class CheckpointError(PolyakError):
    """A checkpoint path cannot be used: missing, not a safetensors file, or a bad directory."""


class OutputError(PolyakError):
    """The output path cannot be used, e.g. it would overwrite one of the inputs."""


class OutputWriteError(OSError):
    """Writing the output failed (disk full, size limit, I/O error); nothing was left behind."""

    def __str__(self) -> str:
        # The message already names the file and the cause; skip OSError's "[Errno N] ...".
        return str(self.strerror) if self.strerror else super().__str__()
