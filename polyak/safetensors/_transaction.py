"""Output transactions: one writer per output, and a folder replaced in one step.

Three guarantees for every output (a ``.safetensors`` file or a sharded folder):

- **One writer at a time.** :class:`OutputLock` holds an exclusive ``fcntl.flock`` on a small
  hidden lock file beside the output for the whole write; a second writer fails at once with
  :class:`OutputError`. The lock file is removed by its holder on release.
- **All or nothing under the final name.** A folder is built complete in a hidden staging
  folder beside the target (:class:`FolderTransaction`), then swapped in with one
  ``renameat2(RENAME_EXCHANGE)`` (or, where that is missing, two renames with recovery), so a
  reader of the final name sees the previous output or the new one, never a mix.
- **Nothing foreign deleted.** Only files of a previous polyak output (its index names
  ``"writer": "polyak"``) are replaced; other files of the folder are carried over as hard
  links, and a folder holding another checkpoint is refused unless ``force=True``.

Temporary names are short (``.polyak-<hash of the output name>-<random>.tmp``), so a 255-byte
output name works, and they are removed only by the holder of that output's lock: a temporary
of a live writer is never touched, whatever its process or PID namespace.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Collection
from typing import Any

from polyak.safetensors._errors import OutputError

__all__ = [
    "INDEX_NAME",
    "WRITER_MARK",
    "COPIED_KEY",
    "OutputLock",
    "FolderTransaction",
    "inspect_folder",
    "temp_path",
    "fsync_dir",
    "on_fatal_signal",
]

INDEX_NAME = "model.safetensors.index.json"
# Written in the index's "metadata" of every folder polyak writes: how a later write
# recognises a previous polyak output, which it may replace without force=True.
WRITER_MARK = ("writer", "polyak")
# Index metadata entry listing the model files (top-level names) polyak.merge copied into the
# folder with the weights: part of the output, replaced by the next write like its shards.
COPIED_KEY = "polyak_copied"


def _tag(path: str) -> tuple[str, str]:
    """(parent folder, short tag of the output's name) for the lock and temporary names."""
    parent, base = os.path.split(os.path.abspath(path))
    digest = hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return parent, f".polyak-{digest}"


def temp_path(path: str) -> str:
    """A fresh short temporary name beside ``path`` that the next writer of ``path`` may clean."""
    parent, tag = _tag(path)
    return os.path.join(parent, f"{tag}-{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: str) -> None:
    """Make the names in ``directory`` durable (a rename is only safe once this returns)."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- cleanup on SIGTERM / SIGHUP -------------------------------------------------------------

_cleanups: dict[int, Callable[[], None]] = {}
_saved: dict[int, Any] = {}
_signals_lock = threading.Lock()
_FATAL = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _on_signal(signum: int, frame: Any) -> None:
    for cleanup in list(_cleanups.values()):
        try:
            cleanup()
        except Exception:  # dying anyway: clean up what can be cleaned
            pass
    signal.signal(signum, _saved.get(signum, signal.SIG_DFL))
    os.kill(os.getpid(), signum)  # die of the signal, as without the handler


def on_fatal_signal(key: int, cleanup: Callable[[], None] | None) -> None:
    """Run ``cleanup`` if SIGTERM or SIGHUP arrives (None: forget ``key``).

    Handlers are installed only from the main thread and only over the default action, so an
    application's own handlers stay in charge (its exception unwinds through the writers'
    ``abort``). After the cleanups the process dies of the signal, as it would have.
    """
    with _signals_lock:
        if cleanup is not None:
            _cleanups[key] = cleanup
        else:
            _cleanups.pop(key, None)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _FATAL:
            current = signal.getsignal(sig)
            if _cleanups and current == signal.SIG_DFL:
                _saved[sig] = current
                signal.signal(sig, _on_signal)
            elif not _cleanups and current is _on_signal:
                signal.signal(sig, _saved.pop(sig, signal.SIG_DFL))


# -- the lock --------------------------------------------------------------------------------


class OutputLock:
    """An exclusive lock on the output ``path``, held until :meth:`release`.

    Also removes what writers of ``path`` killed earlier left behind (their temporary files
    and staging folders): holding the lock proves that none of them is still running.

    Raises:
        OutputError: another writer (in this or another process) holds the lock.
    """

    def __init__(self, path: str) -> None:
        import fcntl  # POSIX only; imported here so that the module imports everywhere

        self.parent, self.tag = _tag(path)
        self.path = os.path.join(self.parent, f"{self.tag}.lock")
        self.target = os.path.abspath(path)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"output {path} is being written by another merge (it holds the lock "
                    f"{self.path}); wait for it to finish or choose another output"
                ) from None
            # The holder before us may have removed the lock file after we opened it: then
            # our lock is on a dead inode, and we must lock the current file instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        self._recover()

    def _recover(self) -> None:
        """Remove leftovers of killed writers of this output; restore a swapped-out folder."""
        stale = [n for n in os.listdir(self.parent) if n.startswith(self.tag + "-")]
        old = sorted(n for n in stale if n.endswith(".old"))
        if old and not os.path.lexists(self.target):
            # Killed between the two renames of the fallback swap: put the previous back.
            os.rename(os.path.join(self.parent, old[-1]), self.target)
            stale.remove(old[-1])
        for name in stale:
            full = os.path.join(self.parent, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                try:
                    os.unlink(full)
                except OSError:
                    pass

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self.fd >= 0:
            try:
                os.unlink(self.path)  # while still holding it: see the inode check above
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1


# -- the folder swap -------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _previous_output(directory: str, names: list[str]) -> set[str]:
    """Names of the previous polyak output in ``directory`` (its index and shards), if any."""
    from polyak.safetensors._reader import read_index  # reader and writer stay independent

    if INDEX_NAME not in names:
        return set()
    try:
        weight_map, meta = read_index(os.path.join(directory, INDEX_NAME))
    except (OSError, ValueError):
        return set()
    if meta.get(WRITER_MARK[0]) != WRITER_MARK[1]:
        return set()
    copied = meta.get(COPIED_KEY)  # model files polyak.merge copied in (config, tokenizer)
    copied = {c for c in copied if isinstance(c, str)} if isinstance(copied, list) else set()
    return {INDEX_NAME} | ((set(weight_map.values()) | copied) & set(names))


def _is_checkpoint_file(name: str) -> bool:
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


def inspect_folder(
    target: str, new_names: Collection[str], *, force: bool = False
) -> tuple[set[str], list[str]]:
    """What writing ``new_names`` into the folder ``target`` would replace and keep, or the
    error that refuses it; reads the folder and changes nothing.

    :class:`FolderTransaction` runs it under the output's lock; a dry run runs it to announce
    the refusal the merge would meet.

    Returns:
        The names the new version drops (a previous polyak output, and with ``force`` the
        files it replaces) and the names it carries over; both empty for a missing folder.

    Raises:
        OutputError: as :class:`FolderTransaction`.
    """
    target = os.path.normpath(os.path.abspath(target))
    if not os.path.lexists(target):
        return set(), []
    if not os.path.isdir(target) or os.path.islink(target):
        raise OutputError(
            f"output {target} exists and is not a folder; name a folder for a sharded "
            "checkpoint or a '.safetensors' file"
        )
    names = sorted(os.listdir(target))
    old = _previous_output(target, names)
    new = set(new_names)
    foreign = [n for n in names if n not in old and (_is_checkpoint_file(n) or n in new)]
    if not force and names and not old:
        raise OutputError(
            f"output folder {target} is not empty ({_few(names)}) and holds no "
            "previous polyak output; choose an empty or new folder, or pass force=True "
            "(--force) to write into it (files with the output's names are replaced, all "
            "others kept)"
        )
    if not force and foreign:
        raise OutputError(
            f"output folder {target} holds checkpoint files that polyak did not write "
            f"({_few(foreign)}); move them, or pass force=True (--force)"
        )
    drop = old | (set(foreign) & new)
    carry = [n for n in names if n not in drop and n not in new]
    subfolders = [n for n in carry if stat.S_ISDIR(os.lstat(os.path.join(target, n)).st_mode)]
    if subfolders:
        raise OutputError(
            f"output folder {target} holds subfolders ({_few(subfolders)}), which "
            "cannot be carried over atomically; move them or choose another output"
        )
    return drop, carry


class FolderTransaction:
    """Builds a new version of the folder ``target`` in a staging folder, then swaps it in.

    Args:
        target: the output folder (it may not exist yet).
        new_names: the file names the new version will hold.
        force: write into a folder that is not a previous polyak output (its files with the
            new names are replaced, all others kept).

    Raises:
        OutputError: ``target`` is not a folder; or holds files that polyak did not write and
            would have to replace or hide (without ``force``), or a subfolder.
    """

    def __init__(self, target: str, new_names: Collection[str], *, force: bool = False) -> None:
        self.target = os.path.normpath(os.path.abspath(target))
        # Inspected under the caller's OutputLock: no other writer changes the folder now.
        self.drop, self.carry = inspect_folder(self.target, new_names, force=force)
        self.staging = temp_path(self.target)
        os.mkdir(self.staging, 0o755)

    def path(self, name: str) -> str:
        """Where to write the file ``name`` of the new version."""
        return os.path.join(self.staging, name)

    def commit(self) -> None:
        """Swap the staging folder in under the target name (the files must be complete)."""
        for name in self.carry:  # other files of the folder, kept as they are
            os.link(os.path.join(self.target, name), self.path(name), follow_symlinks=False)
        fsync_dir(self.staging)
        parent = os.path.dirname(self.target)
        if not os.path.lexists(self.target):
            os.rename(self.staging, self.target)
            self.staging = ""
        elif _exchange(self.staging, self.target):
            self._remove_old(self.staging)
            self.staging = ""
        else:
            old = self.staging[: -len(".tmp")] + ".old"
            os.rename(self.target, old)  # a kill here is undone by the next OutputLock
            os.rename(self.staging, self.target)
            self.staging = ""
            self._remove_old(old)
        fsync_dir(parent)

    def _remove_old(self, old: str) -> None:
        """Delete the swapped-out version: only the names polyak wrote or carried over."""
        for name in [*self.drop, *self.carry]:
            try:
                os.unlink(os.path.join(old, name))
            except FileNotFoundError:
                pass
            except IsADirectoryError:  # a subfolder polyak.merge copied (chat templates)
                shutil.rmtree(os.path.join(old, name), ignore_errors=True)
        try:
            os.rmdir(old)
        except OSError:
            pass  # something else appeared there: never delete what polyak did not write

    def abort(self) -> None:
        """Remove the staging folder (idempotent); the target is untouched."""
        if self.staging:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = ""


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
