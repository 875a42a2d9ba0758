"""Noticing that an input file changed while a merge read it (replaced, resized, rewritten)."""

from __future__ import annotations

import os

from polyak.safetensors._reader import fingerprint

__all__ = ["Fingerprints"]


class Fingerprints:
    """(device, inode, size, mtime_ns) of files, recorded when a checkpoint is opened."""

    def __init__(self, paths: list[str]) -> None:
        self._seen = {p: fingerprint(os.stat(p)) for p in paths}

    def changed(self) -> str | None:
        """Which file changed since it was recorded, and how; or None."""
        for path, then in self._seen.items():
            try:
                now = fingerprint(os.stat(path))
            except OSError as e:
                return f"{path}: it can no longer be found ({e.strerror})"
            if now[:2] != then[:2]:
                return f"{path}: it was replaced by another file"
            if now[2:] != then[2:]:
                return f"{path}: it was modified (size {then[2]} -> {now[2]} bytes, or mtime)"
        return None
