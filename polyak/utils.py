"""Small helpers shared by the merge, the command line and user scripts.

Example:
    >>> from polyak.utils import format_bytes, natural_key
    >>> format_bytes(3 * 2**20)
    '3.0 MiB'
    >>> sorted(["epoch_10", "epoch_9"], key=natural_key)
    ['epoch_9', 'epoch_10']
"""

from __future__ import annotations

import re

__all__ = ["format_bytes", "natural_key"]


def format_bytes(n: float) -> str:
    """A byte count in binary units: ``"512 B"``, ``"1.5 KiB"``, ... up to TiB.

    Args:
        n: a number of bytes (may be a float, e.g. an average per thread).

    Returns:
        Whole bytes below 1 KiB, else one decimal and the largest unit that keeps the number
        under 1024 (TiB at most).

    Raises:
        TypeError: ``n`` is not a number.

    Example:
        >>> format_bytes(1000), format_bytes(1536), format_bytes(5 * 2**40)
        ('1000 B', '1.5 KiB', '5.0 TiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns at TiB


def natural_key(name: str) -> list[tuple[int, int, str]]:
    """A sort key that orders the numbers inside names by value: ``epoch_9`` before ``epoch_10``.

    Args:
        name: a file name (or any string).

    Returns:
        A list comparing runs of digits as integers and other text as text.

    Raises:
        TypeError: ``name`` is not a string.

    Example:
        >>> sorted(["step_1000", "step_200", "step_30"], key=natural_key)
        ['step_30', 'step_200', 'step_1000']
    """
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]
