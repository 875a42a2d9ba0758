"""``SnapshotDir``: keep the last snapshots of a run on disk, choose the weighting later.

Each snapshot is its own safetensors file, ``snapshot-<step>.safetensors`` with the step
zero-padded in the name and recorded in the metadata, written atomically by
:func:`polyak.safetensors.save`. Any schedule can then average them, including those with no
online form such as ``tail(k)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from polyak._accumulate import inputs_to_read
from polyak._average import average_named, weights
from polyak._errors import EmptyInputError, PolyakError, warn_at_caller
from polyak._types import IntPolicy, PathLike, ScheduleLike

__all__ = ["SnapshotDir", "STEP_KEY"]

_PREFIX = "snapshot-"
_SUFFIX = ".safetensors"
_DIGITS = 10  # steps up to 10**10 - 1 sort by name too; larger ones still sort by step
_NAME = re.compile(rf"^{_PREFIX}(\d+){re.escape(_SUFFIX)}$")
#: The metadata key of the step each snapshot file records.
STEP_KEY = "polyak.step"


class SnapshotDir:
    """A directory of parameter snapshots, one safetensors file per saved step.

    The "save the last 10 epochs, decide the weighting later" workflow::

        snaps = polyak.SnapshotDir("runs/snaps", keep=10)
        for epoch in range(epochs):
            train_one_epoch(model)
            snaps.save(model.state_dict(), step=epoch)
        averaged = snaps.average(polyak.schedules.tail(5))

    Args:
        path: The directory; created on the first :meth:`save`.
        keep: Keep only the newest ``keep`` snapshots (by step), deleting older ones after
            each save; ``None`` keeps all. The snapshot just saved is never deleted, even
            when the folder holds ``keep`` snapshots of higher steps (a restarted run):
            the oldest others go instead, and :meth:`save` warns.

    Each step has one file: a folder holding both ``snapshot-1.safetensors`` and
    ``snapshot-0000000001.safetensors`` is refused (by :meth:`paths`, :meth:`save`,
    :meth:`average`...) rather than averaging step 1 twice.

    Raises:
        PolyakError: ``keep`` is not a positive int or ``None``, or ``path`` is a file.

    Example:
        >>> import numpy as np, tempfile, polyak
        >>> snaps = polyak.SnapshotDir(tempfile.mkdtemp(), keep=2)
        >>> for step in range(3):
        ...     path = snaps.save({"w": np.full(2, float(step))}, step)
        >>> snaps.steps()
        [1, 2]
        >>> snaps.average("equal")["w"]
        array([1.5, 1.5])
    """

    def __init__(self, path: PathLike, keep: int | None = None) -> None:
        if keep is not None and (
            isinstance(keep, bool) or not hasattr(keep, "__index__") or int(keep) < 1
        ):
            raise PolyakError(f"keep must be a positive int or None, got keep={keep!r}")
        self._path = Path(path)
        if self._path.exists() and not self._path.is_dir():
            raise PolyakError(f"SnapshotDir path {str(self._path)!r} is a file, not a directory")
        self._keep = None if keep is None else int(keep)  # numpy ints too, as for steps

    @property
    def path(self) -> Path:
        """The directory."""
        return self._path

    @property
    def keep(self) -> int | None:
        """How many snapshots are kept (``None``: all)."""
        return self._keep

    def save(self, params: Any, step: int, *, metadata: Mapping[str, str] | None = None) -> Path:
        """Write ``params`` as the snapshot of ``step``, atomically, then prune to ``keep``.

        Saving a step again replaces its file. With ``keep``, saving a step below the
        ``keep`` newest already in the folder warns (``UserWarning``): the folder is
        probably a finished run's. The new snapshot is kept all the same.
        Tensor names are those of
        :func:`polyak.safetensors.save` (nested keys joined by ``"."``), so a torch
        ``state_dict()`` keeps its keys.

        Args:
            params: A pytree of arrays (numpy, torch, JAX...).
            step: The training step or epoch, an int >= 0; it orders the snapshots.
            metadata: Extra string-to-string metadata to store with the snapshot (e.g. the
                ``t`` and ``gamma`` of a power EMA); ``"polyak.step"`` is reserved.

        Returns:
            The path of the snapshot file.

        Raises:
            PolyakError: ``step`` is not an int >= 0, ``metadata`` is not a map of
                strings to strings or uses the reserved key, or the folder holds two files
                for one step.
            OutputWriteError: the file system refused the write; nothing is left behind.
        """
        from polyak import safetensors as st

        step = _check_step(step)
        meta = {}
        if metadata is not None:
            if not isinstance(metadata, Mapping):
                raise PolyakError(f"metadata must be a dict of strings, got {metadata!r:.100}")
            for key, value in metadata.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise PolyakError(
                        f"metadata must map strings to strings; got {key!r}: {value!r:.100} "
                        "(format numbers with str())"
                    )
            if STEP_KEY in metadata:
                raise PolyakError(f"metadata key {STEP_KEY!r} is reserved for the step")
            meta.update(metadata)
        meta[STEP_KEY] = str(step)
        before = self._entries()  # refuses a folder with two files for one step
        higher = sum(1 for s, _ in before if s > step)
        if self._keep is not None and higher >= self._keep:
            # Out-of-order saves are fine; this one is among the pruned by keep's rule, as
            # when a restarted run reuses a finished run's folder.
            warn_at_caller(
                f"SnapshotDir {str(self._path)!r}: saving step {step} though the folder "
                f"already holds {higher} snapshots of higher steps, the newest "
                f"{before[-1][0]} (a restarted run reusing the folder?). It is kept, the "
                "oldest others are pruned, and the average mixes both runs",
                UserWarning,
            )
        self._path.mkdir(parents=True, exist_ok=True)
        target = self._path / f"{_PREFIX}{step:0{_DIGITS}d}{_SUFFIX}"
        st.save(params, target, meta)
        if self._keep is not None:
            # Never prune the file just written, even when it has the lowest step: save()
            # must return a path that exists (issue 13 item 7). The others go oldest first.
            others = [path for s, path in before if s != step]
            for old in others[: max(0, len(others) - (self._keep - 1))]:
                old.unlink(missing_ok=True)
        return target

    def _entries(self) -> list[tuple[int, Path]]:
        if not self._path.is_dir():
            return []
        entries = []
        for entry in os.scandir(self._path):
            match = _NAME.match(entry.name)
            if match and entry.is_file():
                entries.append((int(match.group(1)), Path(entry.path)))
        entries.sort()
        for (s1, p1), (s2, p2) in zip(entries, entries[1:]):
            if s1 == s2:
                # snapshot-1 and snapshot-0000000001 are one step: averaging both would
                # count it twice, and neither can be told to be the right one.
                raise PolyakError(
                    f"SnapshotDir {str(self._path)!r} holds two files for step {s1}: "
                    f"{p1.name!r} and {p2.name!r}; remove one (one step, one file)"
                )
        return entries

    def paths(self) -> list[Path]:
        """The snapshot files, oldest first (by step, not by file name).

        Returns:
            The paths of the ``snapshot-<step>.safetensors`` files; ``[]`` when the directory
            does not exist yet.

        Example:
            >>> import tempfile, polyak
            >>> polyak.SnapshotDir(tempfile.mkdtemp()).paths()
            []
        """
        return [path for _, path in self._entries()]

    def steps(self) -> list[int]:
        """The saved steps, in increasing order.

        Returns:
            The steps of :meth:`paths`, as ints.

        Example:
            >>> import numpy as np, tempfile, polyak
            >>> snaps = polyak.SnapshotDir(tempfile.mkdtemp())
            >>> for step in (100, 20):
            ...     _ = snaps.save({"w": np.zeros(1)}, step)
            >>> snaps.steps(), len(snaps)
            ([20, 100], 2)
        """
        return [step for step, _ in self._entries()]

    def __len__(self) -> int:
        return len(self._entries())

    def metadata(self, step: int) -> dict[str, str]:
        """The metadata stored with the snapshot of ``step`` (with ``"polyak.step"``).

        Args:
            step: A saved step.

        Returns:
            The file's string-to-string ``__metadata__``.

        Raises:
            PolyakError: ``step`` is not an int >= 0, or no snapshot of that step.

        Example:
            >>> import numpy as np, tempfile, polyak
            >>> snaps = polyak.SnapshotDir(tempfile.mkdtemp())
            >>> _ = snaps.save({"w": np.zeros(1)}, 7, metadata={"epoch": "3"})
            >>> snaps.metadata(7)
            {'epoch': '3', 'polyak.step': '7'}
        """
        from polyak import safetensors as st

        step = _check_step(step)
        for s, path in self._entries():
            if s == step:
                return dict(st.read_metadata(path) or {})
        raise PolyakError(f"{str(self._path)!r} has no snapshot of step {step}")

    def average(
        self,
        schedule: ScheduleLike = None,
        *,
        int_policy: IntPolicy = "last",
        accumulate_dtype: np.dtype | str | None = None,
    ) -> dict[str, Any]:
        """Average the stored snapshots in memory, oldest first, with any schedule.

        Only the snapshots the average depends on are loaded (those the schedule gives a
        weight, and the one the int policy reads: :func:`polyak._accumulate.inputs_to_read`);
        the others are checked from their file headers. To stream the average to a file
        instead, in bounded memory, merge the files:
        ``polyak.safetensors.merge(snaps.paths(), out, schedule)``.

        Args:
            schedule: Anything :func:`polyak.average` accepts (``None`` is the plain mean),
                including schedules with no online form, such as ``tail(k)``.
            int_policy: For int/bool tensors, as in :func:`polyak.average`.
            accumulate_dtype: As in :func:`polyak.average`.

        Returns:
            A dict ``{tensor name: numpy array}``.

        Raises:
            EmptyInputError: the directory holds no snapshot.
            PolyakError: the snapshots differ in tensor names, shapes or dtypes, or the
                schedule's weights are unusable (see :func:`polyak.average`).

        Example:
            >>> import numpy as np, tempfile, polyak
            >>> snaps = polyak.SnapshotDir(tempfile.mkdtemp())
            >>> for step in (10, 20, 30):
            ...     _ = snaps.save({"w": np.array([float(step)])}, step)
            >>> snaps.average(polyak.schedules.tail(2))["w"]
            array([25.])
        """
        from polyak import safetensors as st

        paths = self.paths()
        if not paths:
            raise EmptyInputError(f"{str(self._path)!r} holds no snapshot to average")
        # polyak.average never reads an unused snapshot's data but checks its structure,
        # shapes and dtypes: give it those from the file header, as zero-memory broadcast
        # views, so that tail(k) over a long run loads k files, not all of them.
        read = set(inputs_to_read([weights(schedule, len(paths))], int_policy).any)
        trees = [st.load(p) if i in read else _header_only(p) for i, p in enumerate(paths)]
        return average_named(
            trees, [repr(str(p)) for p in paths], schedule,
            int_policy=int_policy, accumulate_dtype=accumulate_dtype,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"SnapshotDir({str(self._path)!r}, keep={self._keep!r})"


def _header_only(path: Path) -> dict[str, Any]:
    """The tensors of ``path`` with their dtypes and shapes but no data (read-only views of
    one zero), for snapshots whose data an average does not read."""
    from polyak import safetensors as st

    with st.Checkpoint(path) as ck:
        return {
            name: np.broadcast_to(np.zeros((), dtype), shape)
            for name, (dtype, shape) in ((name, ck.info(name)) for name in ck.keys())
        }


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__") or int(step) < 0:
        raise PolyakError(f"step must be an int >= 0, got step={step!r}")
    return int(step)
