"""Renamed keyword arguments keep working for one release, with a warning.

``@renamed(params_list="snapshots")`` lets callers still write ``f(params_list=...)``: the
value is passed on as ``snapshots`` and a :class:`DeprecationWarning` names both spellings.
Giving both is an error, since one of them would be silently dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from polyak._errors import PolyakError, warn_at_caller

__all__ = ["renamed", "rename_keyword"]

F = TypeVar("F", bound=Callable[..., Any])


def rename_keyword(kwargs: dict[str, Any], old: str, new: str, where: str) -> None:
    """Move ``kwargs[old]`` to ``kwargs[new]`` in place, warning that ``old`` is deprecated.

    Args:
        kwargs: The keyword arguments of a call.
        old: The deprecated name.
        new: The current name.
        where: The function's name, for the messages (``"polyak.average"``).

    Raises:
        PolyakError: both ``old`` and ``new`` were given.
    """
    if old not in kwargs:
        return
    if new in kwargs:
        raise PolyakError(
            f"{where}() got both {old}= and {new}=: {old} is the deprecated name of {new}, "
            f"pass only {new}="
        )
    warn_at_caller(  # the user's line: Python shows DeprecationWarnings raised in __main__
        f"{where}(): the keyword {old}= is deprecated and will be removed in the next "
        f"release; use {new}= instead",
        DeprecationWarning,
    )
    kwargs[new] = kwargs.pop(old)


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Decorate a function whose keyword arguments were renamed, ``old="new"`` per rename.

    Example:
        >>> import warnings
        >>> @renamed(params_list="snapshots")
        ... def count(snapshots):
        ...     return len(snapshots)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     count(params_list=[1, 2])
        2
        >>> caught[0].category.__name__
        'DeprecationWarning'
    """

    def decorate(fn: F) -> F:
        where = f"{fn.__module__.split('._')[0]}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                rename_keyword(kwargs, old, new, where)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
