"""``merge``: average N safetensors checkpoints on disk into one, streaming in bounded memory."""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from polyak import _kernel, _stream
from polyak._errors import DtypeError, EmptyInputError, PolyakError, WeightsError
from polyak.safetensors._errors import OutputError
from polyak.safetensors._format import DTYPES
from polyak.safetensors._reader import Checkpoint
from polyak.safetensors._writer import CheckpointWriter, output_size
from polyak.schedules import Schedule, explicit, resolve

__all__ = [
    "MergeReport",
    "MergePlan",
    "OrderWarning",
    "merge",
    "merge_many",
    "plan_merge",
    "parse_dtype",
    "parse_size",
    "natural_order_problem",
]

Path = str | os.PathLike[str]
Progress = bool | Callable[[int, int], None] | None

_DTYPE_NAMES = {
    **{k.lower(): v for k, v in DTYPES.items()},
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "fp16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "fp32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "fp64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "fp8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "fp8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


class OrderWarning(UserWarning):
    """Inputs with numbered names are not in natural order (``epoch_10`` before ``epoch_9``)."""


def parse_dtype(dtype: Any) -> np.dtype | None:
    """The float output dtype named by ``dtype`` ("bf16", "bfloat16", "F16", np.float16...).

    Raises:
        DtypeError: not a float dtype safetensors can store.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        found = _DTYPE_NAMES.get(dtype.strip().lower())
    else:
        try:
            found = np.dtype(dtype)
        except TypeError:
            found = None
    if found is None or _kernel.dtype_kind(found) != "float" or found not in DTYPES.values():
        floats = sorted(k for k, v in _DTYPE_NAMES.items() if _kernel.dtype_kind(v) == "float")
        raise DtypeError(
            f"dtype={dtype!r} is not a float dtype safetensors can store; use one of "
            f"{', '.join(floats)}"
        )
    return found


def _parse_accumulate_dtype(dtype: Any) -> np.dtype | None:
    """The accumulation dtype named by ``dtype`` ("float64", "fp64", np.float64...).

    Only numpy's own floats: a complex accumulator would drop its imaginary part at the end
    (with a ComplexWarning), and bf16/fp8 cannot raise float32's precision.
    """
    if dtype is None:
        return None
    found: np.dtype | None
    if isinstance(dtype, str):
        found = _DTYPE_NAMES.get(dtype.strip().lower())
    else:
        try:
            found = np.dtype(dtype)
        except TypeError:
            found = None
    if found is None or found.kind != "f":
        raise DtypeError(
            f"accumulate_dtype={dtype!r} cannot be used: give float64 (or fp64, double) to "
            "accumulate in float64; float32 is already the least polyak accumulates in"
        )
    return found


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(size: int | str | None) -> int | None:
    """Bytes from ``5000000``, ``"5GB"`` (10**9, as Hugging Face counts) or ``"512MiB"``.

    Raises:
        PolyakError: not a positive size.
    """
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise PolyakError(
                f"max_shard_size={size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'"
            )
        value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise PolyakError(f"max_shard_size must be positive, got max_shard_size={size!r}")
    return value


def _shard_size(max_shard_size: int | str | None, outputs: Sequence[Path]) -> int | None:
    """``max_shard_size`` in bytes, refused when no output is a directory (it would be
    silently ignored: a ``.safetensors`` output is always one file)."""
    size = parse_size(max_shard_size)
    if size is not None and all(os.fspath(o).endswith(".safetensors") for o in outputs):
        raise PolyakError(
            f"max_shard_size={max_shard_size!r} applies to a directory output, but "
            f"{', '.join(os.fspath(o) for o in outputs)} is a single .safetensors file; name a "
            "directory to get a sharded checkpoint"
        )
    return size


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def natural_order_problem(paths: Sequence[Path]) -> str | None:
    """A warning text when numbered file names are not in natural order, else None."""
    names = [os.path.basename(os.path.normpath(os.fspath(p))) for p in paths]
    if len(names) < 2 or not all(re.search(r"\d", n) for n in names):
        return None
    for a, b in zip(names, names[1:]):
        if _natural_key(a) > _natural_key(b):
            return (
                f"inputs are not in natural order: {a!r} is given before {b!r}; polyak keeps "
                "the order given (oldest first), which matters for every schedule but 'equal'"
            )
    return None


@dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Attributes:
        output: the output path.
        files: the files written (the shards and index for a directory).
        tensors: number of tensors written.
        bytes_read: input bytes read (shared by all outputs of one ``merge_many`` pass).
        bytes_written: bytes written to this output.
        seconds: wall time of the whole pass, fsync included.
        weights: the weights applied, oldest input first.
        schedule: a description of the schedule.
        threads: worker threads used.
    """

    output: str
    files: tuple[str, ...]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    weights: tuple[float, ...]
    schedule: str
    threads: int

    @property
    def read_gb_per_s(self) -> float:
        """Input bytes per second, in GB/s (10**9)."""
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9

    def __str__(self) -> str:
        return (
            f"merged {self.tensors} tensors into {self.output}: read {_human(self.bytes_read)}, "
            f"wrote {_human(self.bytes_written)} in {self.seconds:.2f} s "
            f"({self.read_gb_per_s:.2f} GB/s) with weights "
            f"[{', '.join(f'{w:.4g}' for w in self.weights)}]"
        )


@dataclass(frozen=True)
class MergePlan:
    """What a merge will do, checked without writing anything (``polyak merge --dry-run``).

    Attributes:
        inputs: the input paths, oldest first.
        outputs: the output paths.
        tensors: (name, input dtype, output dtype, shape) per tensor.
        weights: one weight vector per output.
        bytes_to_read: input bytes the merge reads (inputs with weight 0 everywhere are skipped).
        bytes_to_write: bytes written per output (headers, metadata and index included).
        buffer_bytes: buffer memory of all threads together.
        threads: worker threads.
        warnings: e.g. the natural-order warning.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    tensors: tuple[tuple[str, str, str, tuple[int, ...]], ...]
    weights: tuple[tuple[float, ...], ...]
    bytes_to_read: int
    bytes_to_write: tuple[int, ...]
    buffer_bytes: int
    threads: int
    warnings: tuple[str, ...] = field(default=())

    def peak_memory_estimate(self, baseline: int | None = None) -> int:
        """Peak resident bytes: the interpreter's current RSS (or ``baseline``) plus buffers."""
        if baseline is None:
            baseline = _current_rss()
        return baseline + self.buffer_bytes + (2 << 20) * self.threads


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _describe(schedule: Schedule | None) -> dict[str, Any]:
    if schedule is None:
        return {"name": "explicit"}
    return {"name": schedule.name, "params": dict(schedule.params)}


class _Job:
    """The opened inputs, the checked plan and the weights shared by plan and merge."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        inputs: Sequence[Path],
        outputs: Sequence[Path],
        weight_vectors: Sequence[Any],
        *,
        normalize: bool,
        dtype: Any,
        int_policy: str,
        accumulate_dtype: Any,
        threads: int | None,
        chunk_elements: int | None,
        schedules: Sequence[Schedule | None] | None = None,
        metadata: Sequence[Mapping[str, str] | None] | None = None,
    ) -> None:
        if isinstance(inputs, (str, os.PathLike)):
            raise PolyakError(
                "inputs must be a sequence of checkpoint paths (oldest first), got a single path"
            )
        self.inputs = [os.fspath(p) for p in inputs]
        self.outputs = [os.fspath(p) for p in outputs]
        if not self.inputs:
            raise EmptyInputError("no checkpoints to merge: inputs is empty")
        if not self.outputs:
            raise OutputError("no outputs given: pass one output path per weight vector")
        weight_vectors = list(weight_vectors)
        if len(weight_vectors) != len(self.outputs):
            raise WeightsError(
                f"{len(weight_vectors)} weight vectors for {len(self.outputs)} outputs; give one "
                "weight vector per output"
            )
        if len(set(map(os.path.abspath, self.outputs))) != len(self.outputs):
            raise OutputError(f"the same output path is given twice: {self.outputs}")
        self.warnings = [w for w in [natural_order_problem(self.inputs)] if w]
        self.out_dtype = parse_dtype(dtype)
        accumulate_dtype = _parse_accumulate_dtype(accumulate_dtype)
        _kernel.check_int_policy(int_policy)
        self.int_policy = int_policy
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1
        ):
            # int() would crash on "x" with a bare ValueError and quietly turn 2.5 into 2.
            raise PolyakError(f"threads must be an int >= 1, got threads={threads!r}")
        self.threads = _default_threads() if threads is None else int(threads)
        self.chunk_elements = _stream.CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        if (
            isinstance(self.chunk_elements, bool)
            or not isinstance(self.chunk_elements, numbers.Integral)
            or (self.chunk_elements < 1)
        ):
            # 0 or less would silently mean one element per step: a merge 10**5 times slower.
            raise PolyakError(
                f"chunk_elements must be an int >= 1, got chunk_elements={chunk_elements!r}"
            )
        n = len(self.inputs)
        self.weights = []
        for k, w in enumerate(weight_vectors):
            w = np.asarray(w, np.float64)
            if w.shape != (n,):
                raise WeightsError(
                    f"weight vector {k} has {w.size} weights but {n} checkpoints were given "
                    "(one weight per input, oldest first)"
                )
            # One code path for validation and normalisation: the same one polyak.average uses.
            self.weights.append(explicit(list(w)).weights(n, normalize=normalize))
        self.checkpoints = [stack.enter_context(Checkpoint(p)) for p in self.inputs]
        self.plans = _stream.plan(
            self.checkpoints,
            self.inputs,
            out_dtype=self.out_dtype,
            int_policy=int_policy,
            accumulate_dtype=accumulate_dtype,
        )
        self._check_outputs()
        self.metadata = [
            self._metadata(w, sched, base)
            for w, sched, base in zip(
                self.weights,
                self.per_output(schedules, "schedules"),
                self.per_output(metadata, "metadata"),
                strict=True,
            )
        ]

    def per_output(self, values: Sequence[Any] | None, name: str) -> list[Any]:
        """``values`` checked to give one entry per output (None: None for every output)."""
        if values is None:
            return [None] * len(self.outputs)
        if isinstance(values, (str, Mapping)) or len(values) != len(self.outputs):
            raise PolyakError(
                f"{name} must give one entry per output ({len(self.outputs)}), got {values!r:.200}"
            )
        return list(values)

    def _metadata(
        self, w: np.ndarray, sched: Schedule | None, base: Mapping[str, str] | None
    ) -> dict[str, str]:
        """An output's ``__metadata__``: ``base`` (default: the first input's) + the record."""
        if base is None:
            meta = dict(self.checkpoints[0].metadata or {})
        elif isinstance(base, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in base.items()
        ):
            meta = dict(base)
        else:
            raise PolyakError(f"metadata entries must map strings to strings, got {base!r:.200}")
        record: dict[str, Any] = {
            "schedule": _describe(sched),
            "weights": [float(x) for x in w],
            "int_policy": self.int_policy,
            "inputs": [os.path.basename(os.path.normpath(p)) for p in self.inputs],
        }
        if self.out_dtype is not None:
            record["dtype"] = str(self.out_dtype)
        meta["polyak"] = json.dumps(record, default=repr)
        return meta

    def _check_outputs(self) -> None:
        protect = set()
        for ck in self.checkpoints:
            protect |= ck.identities()
            for p in [ck.path, ck.index_path]:
                if p is not None:
                    st = os.stat(p)
                    protect.add((st.st_dev, st.st_ino))
        for out in self.outputs:
            if os.path.exists(out):
                st = os.stat(out)
                if (st.st_dev, st.st_ino) in protect:
                    raise OutputError(
                        f"output {out} is one of the inputs; refusing to overwrite it"
                    )
        self.protect = protect

    @property
    def bytes_to_read(self) -> int:
        n = len(self.inputs)
        used = [i for i in range(n) if any(w[i] != 0 for w in self.weights)]
        ints = _stream.int_inputs(self.weights, n, self.int_policy)
        total = 0
        for p in self.plans:
            count = len(used) if p.acc_dtype is not None else len(ints)
            total += p.size * p.dtype.itemsize * count
        return total

    def entries(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        return [(p.name, p.out_dtype, p.shape) for p in self.plans]

    def layout(
        self, output: str, max_shard_size: int | None
    ) -> list[tuple[str, list[str]]] | None:
        first = self.checkpoints[0]
        if output.endswith(".safetensors") or max_shard_size is not None or not first.sharded:
            return None
        return first.layout()


def plan_merge(
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    weight_vectors: Sequence[Any],
    *,
    normalize: bool = True,
    dtype: Any = None,
    int_policy: str = "last",
    accumulate_dtype: Any = None,
    threads: int | None = None,
    max_shard_size: int | str | None = None,
    schedules: Sequence[Schedule | None] | None = None,
    metadata: Sequence[Mapping[str, str] | None] | None = None,
    chunk_elements: int | None = None,
) -> MergePlan:
    """Validate a merge and describe it without writing anything.

    Takes the arguments of :func:`merge_many` and raises what it would raise before writing;
    ``polyak merge --dry-run`` prints the result. Every input header is read and checked; no
    tensor data is read.

    Args:
        inputs: checkpoint paths (files or sharded directories), oldest first.
        outputs: one path per weight vector (``*.safetensors`` file or a directory).
        weight_vectors: per output, one weight per input, oldest first.
        normalize: divide each vector by its sum.
        dtype: cast float tensors of the outputs (e.g. ``"bfloat16"``).
        int_policy: integer/bool tensors, as in :func:`polyak.average`.
        accumulate_dtype: raise the accumulation precision (``"float64"``).
        threads: worker threads (default: the usable cores, at most 8).
        max_shard_size: for directory outputs, the largest shard (``"5GB"`` or bytes).
        schedules: per output, the schedule recorded in the metadata (sizes the header).
        metadata: per output, the ``__metadata__`` to write instead of the first input's.
        chunk_elements: elements per read-and-accumulate step (sizes the buffers).

    Returns:
        A :class:`MergePlan`: tensors, weights, bytes to read and write, buffer memory.

    Raises:
        The errors of :func:`merge_many` short of writing: EmptyInputError, CheckpointError,
        HeaderError, StructureError, WeightsError, DtypeError, OutputError.

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
    shard_bytes = _shard_size(max_shard_size, outputs)  # validated first, as merge_many does
    with contextlib.ExitStack() as stack:
        job = _Job(
            stack, inputs, outputs, weight_vectors, normalize=normalize, dtype=dtype,
            int_policy=int_policy, accumulate_dtype=accumulate_dtype, threads=threads,
            chunk_elements=chunk_elements, schedules=schedules, metadata=metadata,
        )  # fmt: skip
        sizes = tuple(
            output_size(
                out,
                job.entries(),
                metadata=job.metadata[k],
                layout=job.layout(out, shard_bytes),
                max_shard_size=shard_bytes,
                index_metadata=job.checkpoints[0].index_metadata,
            )
            for k, out in enumerate(job.outputs)
        )
        per_thread = _stream.buffer_bytes(
            job.plans, len(job.inputs), len(job.outputs), job.chunk_elements
        )
        return MergePlan(
            inputs=tuple(job.inputs),
            outputs=tuple(job.outputs),
            tensors=tuple((p.name, str(p.dtype), str(p.out_dtype), p.shape) for p in job.plans),
            weights=tuple(tuple(float(x) for x in w) for w in job.weights),
            bytes_to_read=job.bytes_to_read,
            bytes_to_write=sizes,
            buffer_bytes=per_thread * job.threads,
            threads=job.threads,
            warnings=tuple(job.warnings),
        )


def merge_many(
    inputs: Sequence[Path],
    outputs: Sequence[Path],
    weight_vectors: Sequence[Any],
    *,
    normalize: bool = True,
    dtype: Any = None,
    int_policy: str = "last",
    accumulate_dtype: Any = None,
    threads: int | None = None,
    progress: Progress = None,
    max_shard_size: int | str | None = None,
    schedules: Sequence[Schedule | None] | None = None,
    metadata: Sequence[Mapping[str, str] | None] | None = None,
    chunk_elements: int | None = None,
) -> list[MergeReport]:
    """Several weighted averages of the same checkpoints, in one pass over the inputs.

    Each input slice is read once and folded into one accumulator per output, so K outputs
    cost one read of the inputs (post-hoc EMA builds several averages of the same snapshots).
    Every output is written atomically, and all are flushed to disk before the first is
    renamed: if anything fails short of the renames themselves, none of them appears.

    Args:
        inputs: checkpoint paths (files or sharded directories), oldest first.
        outputs: one path per weight vector (``*.safetensors`` file or a directory).
        weight_vectors: per output, one weight per input, oldest first.
        normalize: divide each vector by its sum (as :func:`polyak.weights` does).
        dtype: cast float tensors of the outputs (e.g. ``"bfloat16"``).
        int_policy: integer/bool tensors, as in :func:`polyak.average`.
        accumulate_dtype: raise the accumulation precision (``"float64"``).
        threads: worker threads (default: the usable cores, at most 8).
        progress: ``True`` for a tqdm bar by bytes, a callable ``(done, total)``, or None.
        max_shard_size: for directory outputs, the largest shard (``"5GB"`` or bytes); an
            error when every output is a ``.safetensors`` file.
        schedules: per output, the schedule recorded in the metadata (else "explicit").
        metadata: per output, the ``__metadata__`` to write instead of the first input's
            (``None`` for an output keeps the first input's). The ``"polyak"`` merge record
            is added to every output either way.
        chunk_elements: elements per read-and-accumulate step (default 512 Ki).

    Returns:
        One :class:`MergeReport` per output.

    Raises:
        EmptyInputError: no inputs.
        CheckpointError, HeaderError: an input is missing or malformed.
        StructureError: inputs differ in tensor names, shapes or dtypes (all listed).
        WeightsError: bad weights (count, NaN/inf, sum <= 0 when normalizing).
        DtypeError: bad ``dtype``, or ``int_policy="error"`` with an integer tensor.
        OutputError: an output would overwrite an input.
        PolyakError: ``schedules`` or ``metadata`` does not give one entry per output, or a
            ``metadata`` entry is not a map of strings to strings.
        OutputWriteError: the disk is full or the file too large; nothing is left behind.

    Example:
        >>> import numpy as np, os, tempfile
        >>> import polyak.safetensors as pst
        >>> d = tempfile.mkdtemp()
        >>> paths = [os.path.join(d, f"c{i}.safetensors") for i in range(3)]
        >>> for i, p in enumerate(paths):
        ...     pst.save({"w": np.full(2, float(i), np.float32)}, p)
        >>> outs = [os.path.join(d, "last.safetensors"), os.path.join(d, "mean.safetensors")]
        >>> reports = pst.merge_many(paths, outs, [[0, 0, 1], [1, 1, 1]])
        >>> [float(pst.load(o)["w"][0]) for o in outs]
        [2.0, 1.0]
    """
    t0 = time.perf_counter()
    shard_bytes = _shard_size(max_shard_size, outputs)
    with contextlib.ExitStack() as stack:
        job = _Job(
            stack, inputs, outputs, weight_vectors, normalize=normalize, dtype=dtype,
            int_policy=int_policy, accumulate_dtype=accumulate_dtype, threads=threads,
            chunk_elements=chunk_elements, schedules=schedules, metadata=metadata,
        )  # fmt: skip
        for text in job.warnings:
            warnings.warn(text, OrderWarning, stacklevel=3)
        schedules = job.per_output(schedules, "schedules")
        first = job.checkpoints[0]
        writers: list[CheckpointWriter] = []
        try:
            for k, out in enumerate(job.outputs):
                writers.append(
                    CheckpointWriter(
                        out,
                        job.entries(),
                        metadata=job.metadata[k],
                        layout=job.layout(out, shard_bytes),
                        max_shard_size=shard_bytes,
                        index_metadata=first.index_metadata,
                        protect=job.protect,
                    )
                )
            with _progress(progress, job.bytes_to_read) as tick:
                nread = _stream.run(
                    job.checkpoints,
                    writers,
                    job.weights,
                    job.plans,
                    int_policy=int_policy,
                    threads=job.threads,
                    chunk_elements=job.chunk_elements,
                    progress=tick,
                    labels=job.inputs,
                )
            # Every output on disk before any is renamed: a full disk found by the last fsync
            # must not leave the first outputs behind.
            for wr in writers:
                wr.sync()
            for wr in writers:
                wr.commit()
        except BaseException:
            for wr in writers:
                wr.abort()
            raise
    seconds = time.perf_counter() - t0
    reports = []
    for out, wr, w, sched in zip(job.outputs, writers, job.weights, schedules, strict=True):
        files = wr.files
        reports.append(
            MergeReport(
                output=out,
                files=tuple(files),
                tensors=len(job.plans),
                bytes_read=nread,
                bytes_written=sum(os.path.getsize(f) for f in files),
                seconds=seconds,
                weights=tuple(float(x) for x in w),
                schedule=repr(sched) if sched is not None else "explicit",
                threads=job.threads,
            )
        )
    return reports


@contextlib.contextmanager
def _progress(progress: Progress, total: int):  # type: ignore[no-untyped-def]
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
    inputs: Sequence[Path],
    output: Path,
    schedule: Any = None,
    *,
    normalize: bool = True,
    dtype: Any = None,
    int_policy: str = "last",
    threads: int | None = None,
    progress: Progress = None,
    max_shard_size: int | str | None = None,
    accumulate_dtype: Any = None,
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
        normalize: divide the weights by their sum.
        dtype: cast float tensors of the output, e.g. ``"bfloat16"``.
        int_policy: integer/bool tensors: ``"last"``, ``"first"``, ``"average"``, ``"error"``.
        threads: worker threads (default: the usable cores, at most 8).
        progress: ``True`` for a tqdm progress bar by bytes, or a callable ``(done, total)``.
        max_shard_size: largest output shard, e.g. ``"5GB"`` (10**9 bytes) or ``"2GiB"``;
            for a directory ``output`` only.
        accumulate_dtype: raise the accumulation precision (``"float64"``).

    Returns:
        A :class:`MergeReport`: tensors, bytes read and written, seconds, weights used.

    Raises:
        EmptyInputError: no inputs.
        CheckpointError, HeaderError: an input is missing or malformed (file and tensor named).
        StructureError: inputs differ in tensor names, shapes or dtypes (differences listed).
        ScheduleError, WeightsError: the schedule or its weights cannot be used.
        DtypeError: bad ``dtype``, or ``int_policy="error"`` with an integer tensor.
        OutputError: ``output`` is one of the inputs.
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
    if isinstance(inputs, (str, os.PathLike)):
        raise PolyakError(
            "inputs must be a sequence of checkpoint paths (oldest first), got a single path"
        )
    n = len(inputs)
    if n == 0:
        raise EmptyInputError("no checkpoints to merge: inputs is empty")
    sched = resolve(schedule)
    if sched.name == "explicit" and len(sched.params["weights"]) != n:
        raise WeightsError(
            f"{len(sched.params['weights'])} weights but {n} checkpoints were given "
            "(one weight per input, oldest first)"
        )
    w = sched.weights(n, normalize=normalize)
    (report,) = merge_many(
        inputs,
        [output],
        [w],
        normalize=False,
        dtype=dtype,
        int_policy=int_policy,
        accumulate_dtype=accumulate_dtype,
        threads=threads,
        progress=progress,
        max_shard_size=max_shard_size,
        schedules=[sched],
    )
    return report
