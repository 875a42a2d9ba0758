"""``MergeJob``: a merge's inputs opened and checked, its weights and outputs decided.

What :func:`plan_merge` describes and :func:`merge_many` runs is the same job, built by the
same code, so a plan cannot promise what the run would refuse.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from polyak import _stream
from polyak._errors import EmptyInputError, PolyakError, WeightsError
from polyak._types import PathLike, ScheduleLike
from polyak.safetensors._errors import OutputError
from polyak.safetensors._options import MergeOptions
from polyak.safetensors._parse import shard_size
from polyak.safetensors._reader import Checkpoint
from polyak.safetensors._record import output_metadata
from polyak.safetensors._writer import CheckpointWriter, OutputLayout, preflight
from polyak.schedules import Schedule, explicit, resolve
from polyak.utils import order_problem

__all__ = ["MergeJob", "resolve_weights", "check_paths"]


def check_paths(
    inputs: Sequence[PathLike], outputs: Sequence[PathLike], n_weights: int
) -> tuple[list[str], list[str]]:
    """The input and output paths as strings, checked: a sequence of inputs (not one path),
    none empty, one weight entry per output, no output twice.

    Raises:
        PolyakError: ``inputs`` is a single path.
        EmptyInputError: no inputs.
        OutputError: no outputs, or one given twice.
        WeightsError: not one weight entry per output.
    """
    if isinstance(inputs, (str, os.PathLike)):
        raise PolyakError(
            "inputs must be a sequence of checkpoint paths (oldest first), got a single path"
        )
    ins = [os.fspath(p) for p in inputs]
    outs = [os.fspath(p) for p in outputs]
    if not ins:
        raise EmptyInputError("no checkpoints to merge: inputs is empty")
    if not outs:
        raise OutputError("no outputs given: pass one output path per weight vector")
    if n_weights != len(outs):
        raise WeightsError(
            f"{n_weights} weight vectors for {len(outs)} outputs; give one "
            "weight vector per output"
        )
    if len(set(map(os.path.abspath, outs))) != len(outs):
        raise OutputError(f"the same output path is given twice: {outs}")
    # A folder output is replaced whole: another output inside it would be swapped away.
    resolved = sorted((os.path.abspath(o), o) for o in outs)
    for (a, a_text), (b, b_text) in zip(resolved, resolved[1:]):
        if b.startswith(a.rstrip(os.sep) + os.sep):
            raise OutputError(
                f"output {b_text!r} is inside output {a_text!r}; outputs must be distinct "
                "paths that do not contain one another"
            )
    return ins, outs


def _is_schedule(entry: Any) -> bool:
    return entry is None or isinstance(entry, (Schedule, str)) or callable(entry)


def resolve_weights(
    entries: Sequence[ScheduleLike], n: int, *, normalize: bool
) -> tuple[list[np.ndarray], list[Schedule | None]]:
    """Per output, the float64 weights of ``n`` inputs and the schedule that gave them.

    An entry is a schedule (anything :func:`polyak.schedules.resolve` takes but a sequence:
    a :class:`Schedule`, a name, a callable, None for equal weights) or a weight vector (one
    number per input, oldest first; its schedule is None). Both go through
    :meth:`Schedule.weights`, the one place weights are validated and normalised.

    Raises:
        WeightsError: a vector or an explicit schedule does not have ``n`` weights, or the
            weights cannot be used (NaN/inf, sum <= 0 when normalizing).
        ScheduleError: an entry is not a schedule.
    """
    weights, scheds = [], []
    for k, entry in enumerate(entries):
        if _is_schedule(entry):
            sched: Schedule | None = resolve(entry)
            source = sched
            count = len(sched.params["weights"]) if sched.name == "explicit" else n
            if count != n:
                raise WeightsError(
                    f"{count} weights but {n} checkpoints were given "
                    "(one weight per checkpoint, oldest first)"
                )
        else:
            w = np.asarray(entry, np.float64)
            if w.shape != (n,):
                raise WeightsError(
                    f"weight vector {k} has {w.size} weights but {n} checkpoints were given "
                    "(one weight per checkpoint, oldest first)"
                )
            sched, source = None, explicit(list(w))
        weights.append(source.weights(n, normalize=normalize))
        scheds.append(sched)
    return weights, scheds


def _per_output(values: Sequence[Any] | None, n_outputs: int, name: str) -> list[Any]:
    """``values`` checked to give one entry per output (None: None for every output)."""
    if values is None:
        return [None] * n_outputs
    if isinstance(values, (str, Mapping)) or len(values) != n_outputs:
        raise PolyakError(
            f"{name} must give one entry per output ({n_outputs}), got {values!r:.200}"
        )
    return list(values)


def _protected(checkpoints: Sequence[Any], outputs: Sequence[str]) -> set[Any]:
    """The (device, inode) of every input file, after refusing an output that is one."""
    protect = set()
    for ck in checkpoints:
        protect |= ck.identities()
        # Readers of other kinds (torch, DCP) have no shard index.
        for p in [ck.path, getattr(ck, "index_path", None)]:
            if p is not None:
                st = os.stat(p)
                protect.add((st.st_dev, st.st_ino))
    for out in outputs:
        if os.path.exists(out):
            st = os.stat(out)
            if (st.st_dev, st.st_ino) in protect:
                raise OutputError(f"output {out} is one of the inputs; refusing to overwrite it")
    return protect


class MergeJob:
    """The opened inputs, the checked plan and the weights shared by plan and merge.

    Args:
        stack: closes the opened checkpoints.
        inputs: checkpoint paths, oldest first.
        outputs: one path per entry of ``weights``.
        weights: per output, a schedule or a weight vector (see :func:`resolve_weights`).
        options: the validated settings.
        schedules: per output, the schedule to record instead of the entry's own.
        metadata: per output, the ``__metadata__`` to write instead of the first input's.
        opener: opens one input path as a stream reader (``keys``, ``info``, ``read``,
            ``identities``, ``metadata``, ``close``); default
            :class:`~polyak.safetensors.Checkpoint`. ``polyak.merge`` passes
            :func:`polyak.checkpoints.open_checkpoint`, so every checkpoint kind feeds the
            same job.
        extra_files: ``(source path, path relative to the output)`` pairs written into every
            directory output with its weights (a model's config and tokenizer files).
    """

    def __init__(
        self,
        stack: contextlib.ExitStack,
        inputs: Sequence[PathLike],
        outputs: Sequence[PathLike],
        weights: Sequence[ScheduleLike],
        options: MergeOptions,
        *,
        schedules: Sequence[Schedule | None] | None = None,
        metadata: Sequence[Mapping[str, str] | None] | None = None,
        opener: Callable[[str], Any] = Checkpoint,
        extra_files: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.options = options
        shard_size(options.max_shard_size, outputs)  # refused for .safetensors outputs only
        entries = list(weights)
        self.inputs, self.outputs = check_paths(inputs, outputs, len(entries))
        self.warnings = [w for w in [order_problem(self.inputs)] if w]
        n = len(self.inputs)
        self.weights, own = resolve_weights(entries, n, normalize=options.normalize)
        self.checkpoints = [stack.enter_context(opener(p)) for p in self.inputs]
        self.plans = _stream.plan(
            self.checkpoints,
            self.inputs,
            dtype=options.dtype,
            int_policy=options.int_policy,
            accumulate_dtype=options.accumulate_dtype,
        )
        self.routing = _stream.route(self.weights, options.int_policy)
        self.protect = _protected(self.checkpoints, self.outputs)
        self.extra_files = list(extra_files)
        given = _per_output(schedules, len(self.outputs), "schedules")
        self.schedules = [g if g is not None else s for g, s in zip(given, own, strict=True)]
        self.metadata = [
            output_metadata(
                base,
                self.checkpoints[0].metadata,
                weights=w,
                schedule=sched,
                int_policy=options.int_policy,
                inputs=self.inputs,
                dtype=options.dtype,
            )
            for w, sched, base in zip(
                self.weights,
                self.schedules,
                _per_output(metadata, len(self.outputs), "metadata"),
                strict=True,
            )
        ]

    @property
    def bytes_to_read(self) -> int:
        """Input bytes the run reads (inputs no output needs are skipped)."""
        return _stream.bytes_to_read(self.plans, self.routing)

    @property
    def threads(self) -> int:
        """The worker threads the run uses (chosen from the work, at most the option's)."""
        return _stream.choose_threads(
            self.plans, self.routing, self.options.threads,
            chunk_elements=self.options.chunk_elements,
        )  # fmt: skip

    @property
    def buffer_bytes(self) -> int:
        """Buffer memory of all worker threads together: the stream's own sizing
        (:func:`polyak._stream.buffer_spec`) times the threads it will use."""
        spec = _stream.buffer_spec(self.plans, len(self.outputs), self.options.chunk_elements)
        return spec.nbytes * self.threads

    def entries(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """``(name, output dtype, shape)`` of every tensor, in the first input's order."""
        return [(p.name, p.out_dtype, p.shape) for p in self.plans]

    def layout(self, k: int) -> OutputLayout:
        """What output ``k`` holds, as both its writer and its size estimate take it."""
        out, first = self.outputs[k], self.checkpoints[0]
        shard_bytes = self.options.shard_bytes
        sharded = getattr(first, "sharded", False)  # only safetensors inputs have a layout
        keep = not out.endswith(".safetensors") and shard_bytes is None and sharded
        return OutputLayout(
            out,
            self.entries(),
            metadata=self.metadata[k],
            shards=first.layout() if keep else None,
            max_shard_size=shard_bytes,
            index_metadata=getattr(first, "index_metadata", None),
            extra_files=self.extra_files,
        )

    def output_size(self, k: int) -> int:
        """Bytes output ``k`` will take on disk (headers, metadata, index and copies included).

        Raises:
            OutputError: a file to copy into it cannot be read.
        """
        return self.layout(k).nbytes()

    def copied(self, k: int) -> list[str]:
        """The extra files output ``k`` receives, relative to it (none for a file output)."""
        return [rel for _, rel in self.layout(k).extra_files]

    def preflight(self, k: int) -> None:
        """Meet now the refusals output ``k``'s writer would meet (a dry run's check)."""
        preflight(self.layout(k), self.protect, force=self.options.force)

    def writer(self, k: int) -> CheckpointWriter:
        """The writer of output ``k``, laid out and refusing to write over an input (or into
        a foreign folder, without the ``force`` setting); a folder output receives the extra
        files in the same transaction."""
        return CheckpointWriter(self.layout(k), protect=self.protect, force=self.options.force)
