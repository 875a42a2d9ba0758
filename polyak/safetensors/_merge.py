"""``merge``, ``merge_many`` and ``plan_merge``: average safetensors checkpoints on disk.

Each builds :class:`~polyak.safetensors._options.MergeOptions` once from its keyword
arguments and a :class:`~polyak.safetensors._job.MergeJob` from it; ``plan_merge`` describes
the job, the other two run it through the streaming core (:func:`polyak._stream.run`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from polyak import _kernel, _stream
from polyak._deprecation import renamed
from polyak._errors import OrderWarning, warn_at_caller
from polyak._types import PathLike, ScheduleLike
from polyak.safetensors._errors import CheckpointError
from polyak.safetensors._job import MergeJob
from polyak.safetensors._options import (
    ManyMergeSettings,
    MergeOptions,
    MergeSettings,
    Progress,
)
from polyak.safetensors._reader import Checkpoint
from polyak.safetensors._results import MergePlan, MergeReport
from polyak.safetensors._writer import CheckpointWriter
from polyak.utils import order_inputs

if TYPE_CHECKING:  # PEP 692 keywords; typing.Unpack takes a TypedDict only from Python 3.12
    from typing_extensions import Unpack

__all__ = ["merge", "merge_many", "plan_merge", "run_merge", "describe"]


@renamed(weight_vectors="weights")
def plan_merge(
    inputs: Sequence[PathLike],
    outputs: Sequence[PathLike],
    weights: Sequence[ScheduleLike],
    **settings: Unpack[ManyMergeSettings],
) -> MergePlan:
    """Validate a merge and describe it without writing anything.

    Takes the arguments of :func:`merge_many` and raises what it would raise before writing;
    ``polyak merge --dry-run`` prints the result. Every input header is read and checked; no
    tensor data is read.

    Args:
        inputs: checkpoint paths (files or sharded directories), oldest first.
        outputs: one path per entry of ``weights`` (``*.safetensors`` file or a directory).
        weights: per output, a schedule (as in :func:`merge`) or a weight vector (one weight
            per input, oldest first).
        **settings: the keywords of :func:`merge_many` (:class:`ManyMergeSettings`);
            ``schedules`` and ``metadata`` size the headers, ``chunk_elements`` the buffers,
            ``force`` decides whether an existing folder is refused, as for the merge, and
            ``progress`` is ignored: no tensor data is read.

    Returns:
        A :class:`MergePlan`: tensors, weights, bytes to read and write, buffer memory.

    Raises:
        The errors of :func:`merge_many` short of writing: EmptyInputError, CheckpointError,
        HeaderError, StructureError, WeightsError, DtypeError, OutputError (an output is an
        input, or a folder the merge would refuse to write into).

    Example:
        >>> import numpy as np, os, tempfile
        >>> import polyak.safetensors as pst
        >>> d = tempfile.mkdtemp()
        >>> paths = [os.path.join(d, f"c{i}.safetensors") for i in range(2)]
        >>> for p in paths:
        ...     pst.save({"w": np.ones(1000, np.float32)}, p)
        >>> plan = pst.plan_merge(paths, [os.path.join(d, "avg.safetensors")], [[1, 3]])
        >>> plan.weights, plan.bytes_to_read
        (((0.25, 0.75),), 8000)
    """
    options = MergeOptions.parse("plan_merge", settings, ManyMergeSettings)
    if options.sort is not None:  # None: the plan lists the order problem in .warnings instead
        inputs = order_inputs(inputs, options.sort)
    with contextlib.ExitStack() as stack:
        job = MergeJob(stack, inputs, outputs, weights, options, **_records(settings))
        return describe(job)


def _records(settings: ManyMergeSettings) -> dict[str, Any]:
    """The per-output records of ``settings``, as :class:`MergeJob` takes them."""
    return {"schedules": settings.get("schedules"), "metadata": settings.get("metadata")}


def describe(job: MergeJob) -> MergePlan:
    """The :class:`MergePlan` of an opened job (what ``plan_merge`` returns), once each
    output passed the checks its writer would make (a folder without ``force``...)."""
    for k in range(len(job.outputs)):
        job.preflight(k)
    return MergePlan(
        inputs=tuple(job.inputs),
        outputs=tuple(job.outputs),
        tensors=tuple((p.name, str(p.dtype), str(p.out_dtype), p.shape) for p in job.plans),
        weights=tuple(tuple(float(x) for x in w) for w in job.weights),
        bytes_to_read=job.bytes_to_read,
        bytes_to_write=tuple(job.output_size(k) for k in range(len(job.outputs))),
        buffer_bytes=job.buffer_bytes,
        threads=job.threads,
        warnings=tuple(job.warnings),
    )


@renamed(weight_vectors="weights")
def merge_many(
    inputs: Sequence[PathLike],
    outputs: Sequence[PathLike],
    weights: Sequence[ScheduleLike],
    **settings: Unpack[ManyMergeSettings],
) -> list[MergeReport]:
    """Several weighted averages of the same checkpoints, in one pass over the inputs.

    Each input slice is read once and folded into one accumulator per output, so K outputs
    cost one read of the inputs (post-hoc EMA builds several averages of the same snapshots).
    Every output is written atomically, and all are flushed to disk before the first is
    renamed: if anything fails short of the renames themselves, none of them appears.

    Args:
        inputs: checkpoint paths (files or sharded directories), oldest first.
        outputs: one path per entry of ``weights`` (``*.safetensors`` file or a directory).
        weights: per output, a schedule (as in :func:`merge`: ``"linear"``,
            ``polyak.schedules.ema(0.9)``, None for equal weights, ...) or a weight vector (one
            weight per input, oldest first). A schedule is recorded in the output's metadata.
        **settings: keyword settings, :class:`ManyMergeSettings`: those of :func:`merge`
            (``normalize``, ``dtype``, ``int_policy``, ``accumulate_dtype``, ``threads``,
            ``max_shard_size``, ``chunk_elements``, ``sort``, ``progress``, ``force``) and
            per output ``schedules`` (the schedule to record) and ``metadata`` (the
            ``__metadata__`` to write instead of the first input's).

    Returns:
        One :class:`MergeReport` per output.

    Raises:
        EmptyInputError: no inputs.
        CheckpointError, HeaderError: an input is missing or malformed.
        StructureError: inputs differ in tensor names, shapes or dtypes (all listed).
        ScheduleError, WeightsError: bad weights (count, NaN/inf, sum <= 0 when normalizing).
        DtypeError: bad ``dtype``, or ``int_policy="error"`` with an integer tensor.
        OutputError: an output would overwrite an input.
        PolyakError: ``schedules`` or ``metadata`` does not give one entry per output, or a
            ``metadata`` entry is not a map of strings to strings.
        OutputWriteError: the disk is full or the file too large; nothing is left behind.

    Example:
        Three averages of one run, read once (the last checkpoint, the mean, a linear
        ramp):

        >>> import numpy as np, os, tempfile
        >>> import polyak.safetensors as pst
        >>> run = tempfile.mkdtemp()
        >>> ckpts = []
        >>> for step in (100, 200, 300):
        ...     ckpts.append(os.path.join(run, f"step_{step}.safetensors"))
        ...     pst.save({"w": np.full(2, step // 100 - 1, np.float32)}, ckpts[-1])
        >>> outs = [os.path.join(run, f"{k}.safetensors") for k in ("last", "mean", "lin")]
        >>> reports = pst.merge_many(ckpts, outs, [[0, 0, 1], [1, 1, 1], "linear"])
        >>> [float(pst.load(o)["w"][0]) for o in outs]
        [2.0, 1.0, 1.3333333730697632]
    """
    options = MergeOptions.parse("merge_many", settings, ManyMergeSettings)
    if options.sort is not None:  # None: run_merge warns (job.warnings), as for polyak.merge
        inputs = order_inputs(inputs, options.sort)
    return run_merge(inputs, outputs, weights, options, **_records(settings))


def _check_unchanged(checkpoints: Sequence[Checkpoint]) -> None:
    """Refuse to commit when an input changed while it was read (device, inode, size and
    mtime_ns recorded when it was opened): the average would mix two versions of it."""
    for ck in checkpoints:
        problem = ck.changed()  # every reader kind records its files when opened
        if problem is not None:
            raise CheckpointError(
                f"input {problem} while the merge was reading it; no output was written "
                "(merge again once the input is complete)"
            )


def run_merge(
    inputs: Sequence[PathLike],
    outputs: Sequence[PathLike],
    weights: Sequence[ScheduleLike],
    options: MergeOptions,
    **job_args: Any,
) -> list[MergeReport]:
    """Open, check and run the job; one report per output (the body of merge, merge_many and
    :func:`polyak.merge`; ``job_args`` are :class:`MergeJob`'s keywords: the per-output
    records, and the ``opener`` and ``extra_files`` of :func:`polyak.merge`)."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        job = MergeJob(stack, inputs, outputs, weights, options, **job_args)
        for text in job.warnings:
            warn_at_caller(text, OrderWarning)
        writers: list[CheckpointWriter] = []
        try:
            for k in range(len(job.outputs)):
                writers.append(job.writer(k))
            with _progress(options.progress, job.bytes_to_read) as tick:
                nread, nonfinite, threads = _stream.run(
                    job.checkpoints, writers, job.weights, job.plans,
                    int_policy=options.int_policy, threads=options.threads,
                    chunk_elements=options.chunk_elements, progress=tick, labels=job.inputs,
                )  # fmt: skip
            # Every output on disk before any is renamed: a full disk found by the last fsync
            # must not leave the first outputs behind.
            for wr in writers:
                wr.sync()
            _check_unchanged(job.checkpoints)
            for wr in writers:
                wr.commit()
        except BaseException:
            for wr in writers:
                wr.abort()
            raise
    seconds = time.perf_counter() - t0
    return [
        MergeReport(
            output=out,
            files=tuple(wr.files),
            tensors=len(job.plans),
            bytes_read=nread,
            bytes_written=sum(os.path.getsize(f) for f in wr.files),
            seconds=seconds,
            weights=tuple(float(x) for x in w),
            schedule=repr(sched) if sched is not None else "explicit",
            threads=threads,
            copied=tuple(job.copied(k)),
            nonfinite=nonfinite,
            scales=tuple(p.name for p in job.plans if _kernel.is_scale(p.dtype)),
        )
        for k, (out, wr, w, sched) in enumerate(
            zip(job.outputs, writers, job.weights, job.schedules, strict=True)
        )
    ]


@contextlib.contextmanager
def _progress(progress: Progress, total: int) -> Iterator[Callable[[int], Any] | None]:
    """The per-chunk callback the stream calls with bytes read: None, a tqdm bar's update,
    or a wrapper calling ``progress(done, total)``."""
    if not progress:
        yield None
        return
    if callable(progress) and progress is not True:
        done = [0]

        def call(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        yield call
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge") as bar:
        yield bar.update


def merge(
    inputs: Sequence[PathLike],
    output: PathLike,
    schedule: ScheduleLike = None,
    **settings: Unpack[MergeSettings],
) -> MergeReport:
    """Average safetensors checkpoints on disk into one, in bounded memory.

    Tensor by tensor, in cache-sized chunks, the matching slice of every input is read into a
    reused buffer and ``w_i * x_i`` accumulated in float32 (float64 for float64 tensors),
    rounded once to the output dtype and written at its offset: memory stays at a few chunks
    per thread whatever the model's size and the number of inputs, and the result equals
    :func:`polyak.average` over the loaded inputs bit for bit. The output appears atomically
    (temporary file, fsync, rename); writing over an input is refused.

    Args:
        inputs: checkpoint paths in chronological order (oldest first): ``.safetensors``
            files or sharded Hugging Face directories.
        output: ``*.safetensors`` for one file; anything else is a directory receiving a
            sharded checkpoint (the first input's shard layout unless ``max_shard_size``).
        schedule: as in :func:`polyak.average` (None = equal weights, ``"linear"``,
            ``polyak.schedules.ema(0.9)``, explicit weights, ...).
        **settings: keyword settings (:class:`MergeSettings`, all optional):

            - ``normalize``: divide the weights by their sum (default True).
            - ``dtype``: cast float tensors of the output, e.g. ``"bfloat16"``.
            - ``int_policy``: integer/bool tensors: ``"last"`` (default), ``"first"``,
              ``"average"`` or ``"error"``.
            - ``accumulate_dtype``: raise the accumulation precision (``"float64"``).
            - ``threads``: worker threads (default: the usable cores, at most 8).
            - ``max_shard_size``: the largest shard of a folder output, e.g. ``"5GB"``
              (10**9 bytes) or ``"2GiB"`` (default: the first input's layout).
            - ``chunk_elements``: elements per read-and-accumulate step (default 512 Ki).
            - ``sort``: ``None`` keeps the order given (with an
              :class:`polyak.OrderWarning` when numbered names are out of natural order);
              ``"natural"`` orders them by their numbers, see
              :func:`polyak.utils.order_inputs`.
            - ``progress``: ``True`` for a tqdm bar by bytes, or a callable
              ``(done, total)``.
            - ``force``: write into an existing folder that holds no previous polyak output
              (files with the output's names are replaced, all others kept; see the
              guarantees guide).

    Returns:
        A :class:`MergeReport`: tensors, bytes read and written, seconds, weights used.

    Raises:
        EmptyInputError: no inputs.
        CheckpointError, HeaderError: an input is missing or malformed (file and tensor named).
        StructureError: inputs differ in tensor names, shapes or dtypes (differences listed).
        ScheduleError, WeightsError: the schedule or its weights cannot be used.
        DtypeError: bad ``dtype``, or ``int_policy="error"`` with an integer tensor.
        OutputError: ``output`` is one of the inputs, is being written by another merge, or
            is a folder holding files polyak did not write (without ``force``).
        CheckpointError: an input changed while it was read (nothing is written).
        OutputWriteError: the disk is full or a size limit is hit; nothing is left behind.

    Example:
        >>> import numpy as np, os, tempfile
        >>> import polyak.safetensors as pst
        >>> d = tempfile.mkdtemp()
        >>> paths = [os.path.join(d, f"step_{i}.safetensors") for i in range(3)]
        >>> for i, p in enumerate(paths):
        ...     pst.save({"w": np.full(4, float(i), np.float32)}, p)
        >>> report = pst.merge(paths, os.path.join(d, "avg.safetensors"), "linear")
        >>> report.weights
        (0.16666666666666666, 0.3333333333333333, 0.5)
        >>> pst.load(os.path.join(d, "avg.safetensors"))["w"]
        array([1.3333334, 1.3333334, 1.3333334, 1.3333334], dtype=float32)
    """
    options = MergeOptions.parse("merge", settings)
    if options.sort is not None:  # None: run_merge warns (job.warnings), as for polyak.merge
        inputs = order_inputs(inputs, options.sort)
    (report,) = run_merge(inputs, [output], [schedule], options)
    return report
