"""``MergeOptions``: the settings of a merge, validated once for plan and run alike."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from polyak import _kernel, _stream
from polyak._errors import PolyakError
from polyak._types import IntPolicy
from polyak.safetensors._parse import parse_accumulate_dtype, parse_dtype, parse_size

__all__ = ["MergeOptions", "default_threads"]


def default_threads() -> int:
    """The usable cores, at most 8 (more threads than that only contend for the disk)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _positive_int(name: str, value: Any) -> int:
    # int() would crash on "x" with a bare ValueError and quietly turn 2.5 into 2.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PolyakError(f"{name} must be an int >= 1, got {name}={value!r}")
    return int(value)


@dataclass(frozen=True)
class MergeOptions:
    """How :func:`merge`, :func:`merge_many` and :func:`plan_merge` average: every setting
    but the inputs, outputs and weights, checked once when the options are made.

    The fields hold the validated values: ``dtype`` and ``accumulate_dtype`` become numpy
    dtypes (or None), ``threads`` and ``chunk_elements`` their defaults when None, and
    ``shard_bytes`` is ``max_shard_size`` in bytes.

    Attributes:
        normalize: divide each weight vector by its sum.
        dtype: cast float tensors of the outputs (``"bf16"``, ``"float16"``, np.float32...).
        int_policy: integer/bool tensors: ``"last"``, ``"first"``, ``"average"``, ``"error"``.
        accumulate_dtype: raise the accumulation precision (``"float64"``).
        threads: worker threads (default: the usable cores, at most 8).
        max_shard_size: for directory outputs, the largest shard (``"5GB"`` or bytes).
        chunk_elements: elements per read-and-accumulate step (default 512 Ki).
        shard_bytes: ``max_shard_size`` in bytes (None: keep the first input's layout).

    Raises:
        DtypeError: ``dtype`` or ``accumulate_dtype`` cannot be used.
        PolyakError: a bad ``int_policy``, ``threads``, ``chunk_elements`` or
            ``max_shard_size`` (naming the argument and its value).

    Example:
        >>> from polyak.safetensors._options import MergeOptions
        >>> opts = MergeOptions(dtype="bf16", threads=2)
        >>> opts.dtype, opts.threads, opts.chunk_elements
        (dtype(bfloat16), 2, 524288)
    """

    normalize: bool = True
    dtype: Any = None
    int_policy: IntPolicy = "last"
    accumulate_dtype: Any = None
    threads: int | None = None
    max_shard_size: int | str | None = None
    chunk_elements: int | None = None
    shard_bytes: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The order of the checks is the order in which errors are reported.
        checked = {
            "shard_bytes": parse_size(self.max_shard_size),
            "dtype": parse_dtype(self.dtype),
            "accumulate_dtype": parse_accumulate_dtype(self.accumulate_dtype),
            "int_policy": _kernel.check_int_policy(self.int_policy),
            "threads": (
                default_threads()
                if self.threads is None
                else _positive_int("threads", self.threads)
            ),
            # 0 or less would silently mean one element per step: a merge 10**5 times slower.
            "chunk_elements": _positive_int(
                "chunk_elements",
                _stream.CHUNK_ELEMENTS if self.chunk_elements is None else self.chunk_elements,
            ),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
