"""Type aliases shared by polyak's public signatures.

They are real aliases (not strings), so type checkers and Sphinx see what each argument
accepts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

import numpy as np

from polyak.schedules import Schedule

__all__ = ["ScheduleLike", "IntPolicy", "PathLike"]

#: Anything :func:`polyak.schedules.resolve` turns into a :class:`polyak.Schedule`: ``None``
#: (the plain mean), a name such as ``"linear"``, a schedule, explicit weights (oldest
#: first) or a callable ``n -> weights``.
ScheduleLike: TypeAlias = (
    Schedule | str | Sequence[float] | np.ndarray | Callable[[int], Sequence[float]] | None
)

#: What to do with integer and bool leaves: keep the newest (``"last"``), the oldest
#: (``"first"``), average and round half to even (``"average"``), or refuse (``"error"``).
IntPolicy: TypeAlias = Literal["last", "first", "average", "error"]

#: A file system path, as ``open`` takes it.
PathLike: TypeAlias = str | os.PathLike[str]
