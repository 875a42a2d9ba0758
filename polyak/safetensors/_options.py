"""The settings of a merge: declared once as keywords, validated once into ``MergeOptions``.

Every merge and plan function (``polyak.merge``, ``polyak.plan``, ``polyak.safetensors.merge``,
``merge_many``, ``plan_merge``) takes its settings as ``**settings``. The keywords are declared
once, as the :class:`typing.TypedDict` classes below (so type checkers and editors still see
each name and type, PEP 692), and turned once into a frozen :class:`MergeOptions` by
:meth:`MergeOptions.parse`, which names the function in every error.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np

from polyak import _kernel, _stream
from polyak._errors import PolyakError
from polyak._types import IntPolicy
from polyak.safetensors._parse import parse_accumulate_dtype, parse_dtype, parse_size
from polyak.schedules import Schedule

__all__ = [
    "MergeSettings",
    "ManyMergeSettings",
    "CheckpointMergeSettings",
    "MergeOptions",
    "Progress",
    "default_threads",
]

#: ``True`` for a tqdm bar by bytes, a callable ``(done, total)``, or None.
Progress = bool | Callable[[int, int], None] | None


class MergeSettings(TypedDict, total=False):
    """The keyword settings every merge and plan function takes (all optional).

    Keys:
        normalize: divide the weights by their sum (default True).
        dtype: cast float tensors of the outputs: ``"bf16"``, ``"float16"``, ``np.float32``,
            ``"fp8_e4m3"``... (default: keep each tensor's dtype).
        int_policy: integer/bool tensors: ``"last"`` (default), ``"first"``, ``"average"`` or
            ``"error"``, as in :func:`polyak.average`.
        accumulate_dtype: raise the accumulation precision, e.g. ``"float64"`` (default:
            float32, float64 for float64 tensors).
        threads: at most this many worker threads, chosen from the work (default: the
            usable cores, at most 8).
        max_shard_size: for a folder output, the largest shard (``"5GB"``, ``"2GiB"`` or
            bytes; default: the first input's shard layout); an error for a file output.
        chunk_elements: elements per read-and-accumulate step (default 512 Ki).
        sort: ``None`` (default) keeps the order given, with a :class:`polyak.OrderWarning`
            when numbered names are out of natural order; ``"natural"`` orders them by their
            numbers (``epoch_9`` before ``epoch_10``), see :func:`polyak.utils.order_inputs`.
        progress: ``True`` for a tqdm bar by bytes, or a callable ``(done, total)``; a plan
            reads no tensor data and ignores it.
        force: write into an existing folder that holds no previous polyak output (files
            with the output's names are replaced, all others kept); without it, a plan
            refuses such a folder as the merge would.

    Example:
        >>> from polyak.safetensors import MergeSettings
        >>> settings: MergeSettings = {"dtype": "bf16", "threads": 2}
        >>> sorted(settings)
        ['dtype', 'threads']
    """

    normalize: bool
    dtype: Any
    int_policy: IntPolicy
    accumulate_dtype: Any
    threads: int | None
    max_shard_size: int | str | None
    chunk_elements: int | None
    sort: Literal["natural"] | None
    progress: Progress
    force: bool


class ManyMergeSettings(MergeSettings, total=False):
    """The settings of :func:`merge_many` and :func:`plan_merge`: :class:`MergeSettings` and
    two per-output records.

    Keys:
        schedules: per output, the schedule recorded in its metadata instead of the weights
            entry's own (a weight vector records "explicit").
        metadata: per output, the ``__metadata__`` to write instead of the first input's
            (``None`` keeps the first input's); the ``"polyak"`` merge record is added
            either way.

    Example:
        >>> from polyak.safetensors import ManyMergeSettings
        >>> settings: ManyMergeSettings = {"dtype": "bf16", "metadata": [{"run": "a"}, None]}
        >>> sorted(settings)
        ['dtype', 'metadata']
    """

    schedules: Sequence[Schedule | None] | None
    metadata: Sequence[Mapping[str, str] | None] | None


class CheckpointMergeSettings(MergeSettings, total=False):
    """The settings of :func:`polyak.merge` and :func:`polyak.plan`: :class:`MergeSettings`
    and where to find the weights.

    Keys:
        key: where the weights sit in a nested torch or DCP checkpoint: ``"state_dict"``
            (Lightning), ``"model"``, ``"state_dict_ema"``, dotted for deeper nesting.
        copy_files: copy the newest model folder's config and tokenizer files into a folder
            output (default True).

    Example:
        >>> from polyak.safetensors import CheckpointMergeSettings
        >>> settings: CheckpointMergeSettings = {"key": "state_dict", "sort": "natural"}
        >>> sorted(settings)
        ['key', 'sort']
    """

    key: str | None
    copy_files: bool


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


def _check_names(caller: str, given: Mapping[str, Any], accepted: type) -> None:
    """A misspelt setting is a TypeError, as for any Python function, listing the names."""
    unknown = sorted(set(given) - set(accepted.__annotations__))
    if unknown:
        names = ", ".join(sorted(accepted.__annotations__))
        raise TypeError(
            f"{caller}() got unexpected keyword argument(s) {', '.join(unknown)}; it takes {names}"
        )


@dataclass(frozen=True)
class MergeOptions:
    """The validated :class:`MergeSettings` of one call, the only form the job and the
    stream see.

    Attributes:
        normalize: divide each weight vector by its sum.
        dtype: the output dtype of float tensors (None: each tensor's own).
        int_policy: integer/bool tensors: ``"last"``, ``"first"``, ``"average"``, ``"error"``.
        accumulate_dtype: the accumulator dtype (None: float32, float64 for float64).
        threads: at most this many worker threads.
        shard_bytes: ``max_shard_size`` in bytes (None: keep the first input's layout).
        max_shard_size: the size as given (for the error of a file output).
        chunk_elements: elements per read-and-accumulate step.
        sort: ``"natural"`` or None.
        progress: as in :class:`MergeSettings`.
        force: as in :class:`MergeSettings`.

    Example:
        >>> from polyak.safetensors._options import MergeOptions
        >>> opts = MergeOptions.parse("merge", {"dtype": "bf16", "threads": 2})
        >>> opts.dtype, opts.threads, opts.chunk_elements
        (dtype(bfloat16), 2, 524288)
    """

    normalize: bool
    dtype: np.dtype | None
    int_policy: IntPolicy
    accumulate_dtype: np.dtype | None
    threads: int
    shard_bytes: int | None
    max_shard_size: int | str | None
    chunk_elements: int
    sort: Literal["natural"] | None
    progress: Progress
    force: bool

    @classmethod
    def parse(
        cls, caller: str, settings: Mapping[str, Any], accepted: type = MergeSettings
    ) -> MergeOptions:
        """Check ``settings`` (the keys of ``accepted``, a :class:`MergeSettings` class) and
        return the options; keys of ``accepted`` beyond :class:`MergeSettings` are the
        caller's and ignored here.

        Raises:
            TypeError: a key that ``caller`` does not take (as Python raises for any
                function), listing the ones it takes.
            DtypeError: ``dtype`` or ``accumulate_dtype`` cannot be used.
            PolyakError: a bad ``int_policy``, ``threads``, ``chunk_elements`` or
                ``max_shard_size`` (naming the argument and its value).
        """
        _check_names(caller, settings, accepted)
        get = settings.get
        chunk = get("chunk_elements")
        threads = get("threads")
        # Keyword order is the order in which errors are reported.
        return cls(
            shard_bytes=parse_size(get("max_shard_size")),
            dtype=parse_dtype(get("dtype")),
            accumulate_dtype=parse_accumulate_dtype(get("accumulate_dtype")),
            int_policy=_kernel.check_int_policy(get("int_policy", "last")),
            threads=default_threads() if threads is None else _positive_int("threads", threads),
            # 0 or less would silently mean one element per step: a merge 10**5 times slower.
            chunk_elements=_positive_int(
                "chunk_elements", _stream.CHUNK_ELEMENTS if chunk is None else chunk
            ),
            normalize=get("normalize", True),
            max_shard_size=get("max_shard_size"),
            sort=get("sort"),
            progress=get("progress"),
            force=get("force", False),
        )
