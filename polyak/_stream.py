"""Tensor-major streaming average of N checkpoints, in bounded memory.

The core of ``polyak.safetensors.merge``, with no knowledge of files: inputs are *readers*
(``keys()``, ``info(name) -> (dtype, shape)``, ``read(name, elem_start, out)``) and outputs
are *writers* (``write(name, elem_start, array)``). For every tensor, span by span, each
input's slice is read into a reused buffer and folded into one accumulator per output with
:func:`polyak._kernel.accumulate`, then rounded once with :func:`polyak._kernel.finalize`:
the same kernel, in the same order, as :func:`polyak.average`, so the streamed result equals
the in-memory one bit for bit. Spans run in parallel threads (numpy releases the GIL); each
thread owns its buffers, so peak memory is a few chunks per thread, whatever N and the
model's size. Several weight vectors produce several outputs from one pass over the inputs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from polyak import _kernel
from polyak._accumulate import WeightedSum, inputs_to_read
from polyak._errors import DtypeError, EmptyInputError, StructureError, WeightsError
from polyak._types import IntPolicy

__all__ = [
    "RunResult",
    "Reader",
    "Writer",
    "TensorPlan",
    "plan",
    "run",
    "Routing",
    "route",
    "bytes_to_read",
    "BufferSpec",
    "buffer_spec",
    "choose_threads",
    "PARALLEL_ITEM_BYTES",
    "SPAN_BYTES",
    "CHUNK_ELEMENTS",
]

# A work item covers at most this many input bytes of one tensor: large enough that the
# per-item Python overhead vanishes, small enough to spread a big tensor over threads.
SPAN_BYTES = 8 << 20

# Elements per read-and-accumulate step. Larger than the kernel's in-memory chunk: here each
# step is also one pread per input, whose fixed cost (syscall, Python call, page-cache
# lookup) dominates at 256 KiB; at 2 MiB of float32 per buffer the working set still sits in
# L3 and a merge takes ~15% less CPU (measured, benchmarks/merge.py). Memory per thread stays
# a few such buffers.
CHUNK_ELEMENTS = 1 << 19


class RunResult(NamedTuple):
    """What :func:`run` did: input bytes read, NaN/Inf input elements met (float tensors
    of the inputs read; a chunk with any is read twice, and both reads are counted), worker
    threads used."""

    bytes_read: int
    nonfinite: int
    threads: int


class Reader(Protocol):
    """One input checkpoint, as the stream needs it."""

    def keys(self) -> Sequence[str]: ...

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]: ...

    def read(self, name: str, elem_start: int, out: np.ndarray) -> None: ...


class Writer(Protocol):
    """One output checkpoint, laid out beforehand; receives slices at element offsets."""

    def write(self, name: str, elem_start: int, array: np.ndarray) -> None: ...


@dataclass(frozen=True)
class TensorPlan:
    """How one tensor is merged: input dtype, output dtype, accumulator (None for ints)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    out_dtype: np.dtype
    acc_dtype: np.dtype | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def plan(
    readers: Sequence[Reader],
    labels: Sequence[str],
    *,
    dtype: np.dtype | None = None,
    int_policy: IntPolicy = "last",
    accumulate_dtype: np.dtype | str | None = None,
) -> list[TensorPlan]:
    """Check that all inputs match the first and say how each tensor will be merged.

    Args:
        readers: the inputs, oldest first.
        labels: a name for each input, used in error messages (its path).
        dtype: cast float tensors to this output dtype (None keeps the input dtype).
        int_policy: as in :func:`polyak.average`; ``"error"`` fails here, before any data.
        accumulate_dtype: raise the accumulation precision (e.g. ``"float64"``).

    Returns:
        One :class:`TensorPlan` per tensor, in the first input's order.

    Raises:
        EmptyInputError: no inputs.
        StructureError: inputs differ in tensor names, shapes or dtypes; the message lists
            the first differences of each kind with counts.
        DtypeError: a tensor cannot be averaged, or int_policy="error" meets an int tensor.
    """
    if not readers:
        raise EmptyInputError("no checkpoints to merge")
    _kernel.check_int_policy(int_policy)
    ref = readers[0]
    names = list(ref.keys())
    ref_info = {name: ref.info(name) for name in names}
    _check_structure(readers, labels, names, ref_info)
    where = f"{labels[0]}: tensor "
    return [
        _tensor_plan(name, *ref_info[name], where, dtype, int_policy, accumulate_dtype)
        for name in names
    ]


def _check_structure(
    readers: Sequence[Reader],
    labels: Sequence[str],
    names: list[str],
    ref_info: dict[str, tuple[np.dtype, tuple[int, ...]]],
) -> None:
    """Raise StructureError listing how each input differs from the first, if any does."""
    problems: list[str] = []
    name_set = set(names)
    for label, reader in zip(labels[1:], readers[1:], strict=True):
        # Sets, not lists: a membership test per name must be O(1) (100k mismatched names
        # took 104 s with list lookups, issue 13 item 17).
        keys = set(reader.keys())
        missing_set = name_set - keys
        missing = sorted(missing_set)
        extra = sorted(keys - name_set)
        shapes: list[str] = []
        dtypes: list[str] = []
        for name in names:
            if name in missing_set:
                continue
            got_dtype, shape = reader.info(name)
            rdtype, rshape = ref_info[name]
            if tuple(shape) != tuple(rshape):
                shapes.append(f"{name!r} {tuple(shape)} != {tuple(rshape)}")
            if np.dtype(got_dtype) != np.dtype(rdtype):
                dtypes.append(f"{name!r} {np.dtype(got_dtype)} != {np.dtype(rdtype)}")
        for what, items in (
            ("missing", [repr(m) for m in missing]),
            ("unexpected", [repr(e) for e in extra]),
            ("shape differs for", shapes),
            ("dtype differs for", dtypes),
        ):
            if items:
                problems.append(f"{label}: {what} {len(items)} tensor(s): {_preview(items)}")
    if problems:
        raise StructureError(
            f"checkpoints do not match {labels[0]}:\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  ... ({len(problems) - 20} more inputs differ)" if len(problems) > 20 else "")
        )


def _tensor_plan(
    name: str,
    in_dtype: np.dtype,
    shape: tuple[int, ...],
    where: str,
    dtype: np.dtype | None,
    int_policy: IntPolicy,
    accumulate_dtype: np.dtype | str | None,
) -> TensorPlan:
    """How one tensor is merged (see :func:`plan`); ``where`` prefixes its error messages."""
    in_dtype = np.dtype(in_dtype)
    kind = _kernel.dtype_kind(in_dtype)
    where = f"{where}{name!r}"
    if kind == "int":
        if int_policy == "error":
            raise _kernel.int_policy_error(where, in_dtype)
        return TensorPlan(name, in_dtype, tuple(shape), in_dtype, None)
    if kind in ("float", "complex"):
        acc = _kernel.accumulator_dtype(in_dtype, accumulate_dtype)
        # dtype is a float type: complex tensors keep their own dtype.
        out = np.dtype(dtype) if dtype is not None and kind == "float" else in_dtype
        return TensorPlan(name, in_dtype, tuple(shape), out, acc)
    raise DtypeError(f"{where}: dtype {in_dtype} cannot be averaged")


def _check_weights(weight_vectors: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    out = []
    for k, w in enumerate(weight_vectors):
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (n,):
            raise WeightsError(f"weight vector {k} has shape {w.shape}, expected ({n},)")
        if not np.all(np.isfinite(w)):
            raise WeightsError(f"weight vector {k} has NaN or inf entries: {w.tolist()}")
        out.append(w)
    if not out:
        raise WeightsError("no weight vectors given")
    return out


# -- routing: which input feeds which output, with which coefficient ---------------------------
@dataclass(frozen=True)
class Routing:
    """Who reads what, decided once from the weights (the rule :func:`polyak.average` uses).

    Attributes:
        divisors: per output, the one division applied at the end (see
            :func:`polyak._kernel.split_weights`).
        feeds: per input, the ``(output, coefficient)`` pairs it is added to, oldest input
            first, nonzero coefficients only.
        used: the inputs float tensors are read from (0 in every vector: never read).
        int_read: the inputs integer tensors are read from.
        int_weights: per output, the weights of ``int_read``.
    """

    divisors: tuple[float, ...]
    feeds: tuple[tuple[tuple[int, float], ...], ...]
    used: tuple[int, ...]
    int_read: tuple[int, ...]
    int_weights: tuple[np.ndarray, ...]


def route(weight_vectors: Sequence[np.ndarray], int_policy: IntPolicy) -> Routing:
    """The :class:`Routing` of float64 weight vectors of equal length (one per output)."""
    # Exactly as polyak.average: rational weights become small integer coefficients and one
    # division at the end.
    split = [_kernel.split_weights(w) for w in weight_vectors]
    # The one read rule (polyak.average's): float tensors read the inputs some output weighs,
    # integer tensors only those the int policy looks at (the newest for "last").
    reads = inputs_to_read([c for c, _ in split], int_policy)
    return Routing(
        divisors=tuple(d for _, d in split),
        feeds=tuple(
            tuple((k, float(c[i])) for k, (c, _) in enumerate(split) if c[i] != 0)
            for i in range(len(weight_vectors[0]))
        ),
        used=tuple(reads.floats),
        int_read=tuple(reads.ints),
        int_weights=tuple(w[reads.ints] for w in weight_vectors),
    )


def bytes_to_read(plans: Sequence[TensorPlan], routing: Routing) -> int:
    """Input bytes a run with ``routing`` reads: float tensors from ``routing.used``, integer
    tensors from ``routing.int_read``."""
    total = 0
    for p in plans:
        count = len(routing.used) if p.acc_dtype is not None else len(routing.int_read)
        total += p.size * p.dtype.itemsize * count
    return total


# -- buffers: sized once, by one function, for the plan's estimate and the run -----------------
@dataclass(frozen=True)
class BufferSpec:
    """The buffers one worker thread holds: for each read-and-accumulate step of ``elements``
    elements, an input slice, a scratch, one accumulator per output and an output slice."""

    elements: int
    in_item: int
    acc_item: int
    out_item: int
    n_outputs: int
    has_ints: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes one thread holds (integer tensors, when there are any: one slice per input
        read, combine_ints' float64 sum and its result, within the same budget)."""
        floats = self.elements * (
            self.in_item + self.acc_item * (1 + self.n_outputs) + self.out_item
        )
        ints = self.elements * (self.in_item + 8 + self.out_item) * 2 if self.has_ints else 0
        return max(floats, ints)


def buffer_spec(plans: Sequence[TensorPlan], n_outputs: int, chunk_elements: int) -> BufferSpec:
    """The :class:`BufferSpec` for merging ``plans`` into ``n_outputs`` outputs."""
    elements = max(1, min(chunk_elements, max((p.size for p in plans), default=1)))
    return BufferSpec(
        elements=elements + elements % 2,  # even: spans of packed F4 values cover whole bytes
        in_item=max((p.dtype.itemsize for p in plans), default=0),
        acc_item=max((p.acc_dtype.itemsize for p in plans if p.acc_dtype is not None), default=0),
        out_item=max((p.out_dtype.itemsize for p in plans), default=0),
        n_outputs=n_outputs,
        has_ints=any(p.acc_dtype is None for p in plans),
    )


class _Buffers:
    """One thread's buffers, allocated once as raw bytes and viewed per tensor dtype."""

    def __init__(self, spec: BufferSpec) -> None:
        m = spec.elements
        self.x = np.empty(m * spec.in_item, np.uint8)
        self.out = np.empty(m * spec.out_item, np.uint8)
        self.scratch = np.empty(m * spec.acc_item, np.uint8)
        self.accs = [np.empty(m * spec.acc_item, np.uint8) for _ in range(spec.n_outputs)]


def _view(buf: np.ndarray, dtype: np.dtype, m: int) -> np.ndarray:
    return buf[: m * dtype.itemsize].view(dtype)


# -- spans: one tensor's elements [start, stop), read, folded and written ----------------------
@dataclass(frozen=True)
class _Stream:
    """What every span of one run needs; each thread keeps its own buffers in ``local``."""

    readers: Sequence[Reader]
    writers: Sequence[Writer]
    routing: Routing
    spec: BufferSpec
    int_policy: IntPolicy
    last_label: str
    local: threading.local
    nonfinite: list[int]  # NaN/Inf input elements, one count per chunk that had any

    def buffers(self) -> _Buffers:
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            bufs = self.local.bufs = _Buffers(self.spec)
        return bufs


def _float_span(st: _Stream, p: TensorPlan, start: int, stop: int) -> int:
    bufs = st.buffers()
    sub = st.spec.elements
    nread = 0
    # An overflow or NaN is found below and redone by _careful_chunk: no RuntimeWarning.
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(start, stop, sub):
            nread += _float_chunk(st, bufs, p, s, min(sub, stop - s))
    return nread


def _float_chunk(st: _Stream, bufs: _Buffers, p: TensorPlan, s: int, m: int) -> int:
    """Read, fold and write elements ``[s, s + m)`` of one float tensor; the bytes read."""
    route_ = st.routing
    acc_dtype = np.dtype(p.acc_dtype)
    nread = 0
    x = _view(bufs.x, p.dtype, m)
    scratch = _view(bufs.scratch, acc_dtype, m)
    # One sum per output over this chunk of the preallocated buffers: nothing allocated.
    sums = [WeightedSum(_view(a, acc_dtype, m), scratch) for a in bufs.accs]
    for i in route_.used:
        st.readers[i].read(p.name, s, x)
        nread += x.nbytes
        for k, wi in route_.feeds[i]:
            sums[k].add(x, wi)
    # Two cheap reductions per output tell finite chunks (all of them, normally) from
    # those with NaN/Inf: an input's, or an overflow of the integer-coefficient sum.
    divisors = route_.divisors
    if not all(_kernel.all_finite(t.acc) for t in sums):
        nread += _careful_chunk(st, p, s, x, sums)
        divisors = (1.0,) * len(sums)
    for k, total in enumerate(sums):
        # float32/float64 tensors are rounded in place, others into the output slice.
        out = total.acc if p.out_dtype == acc_dtype else _view(bufs.out, p.out_dtype, m)
        st.writers[k].write(p.name, s, total.result(out=out, divisor=divisors[k]))
    return nread


def _careful_chunk(
    st: _Stream, p: TensorPlan, s: int, x: np.ndarray, sums: list[WeightedSum]
) -> int:
    """Redo one chunk whose sum is not finite: count its NaN/Inf input elements, and
    accumulate with the normalized weights ``c / divisor``.

    Integer coefficients (``split_weights``) make ``x1 + x2`` overflow for finite inputs
    near the dtype's maximum; with normalized nonnegative weights every partial sum stays
    within the inputs' range, so a finite average of finite inputs stays finite. Only such
    chunks pay for this second read. The sums then need no division. Returns the bytes read.
    """
    route_ = st.routing
    nread = bad = 0
    for k in range(len(sums)):
        sums[k] = WeightedSum(sums[k].acc, sums[k].scratch)
    for i in route_.used:
        st.readers[i].read(p.name, s, x)
        nread += x.nbytes
        bad += x.size - int(np.count_nonzero(np.isfinite(x)))
        for k, c in route_.feeds[i]:
            sums[k].add(x, c / route_.divisors[k])
    st.nonfinite.append(bad)  # list.append is atomic: worker threads share the list
    return nread


def _int_span(st: _Stream, p: TensorPlan, start: int, stop: int) -> int:
    int_read = st.routing.int_read
    # One slice per input read, so the slices shrink as N grows and memory stays bounded.
    step = max(1, st.spec.elements // len(int_read))
    where = f"{st.last_label}: tensor {p.name!r}"
    nread = 0
    for s in range(start, stop, step):
        m = min(step, stop - s)
        xs = []
        for i in int_read:
            x = np.empty(m, p.dtype)
            st.readers[i].read(p.name, s, x)
            nread += x.nbytes
            xs.append(x)
        for k, w in enumerate(st.routing.int_weights):
            out = _kernel.combine_ints(xs, w, st.int_policy, where)
            st.writers[k].write(p.name, s, np.asarray(out, p.out_dtype))
    return nread


Span = Callable[[_Stream, TensorPlan, int, int], int]


def _work_items(
    plans: Sequence[TensorPlan], sub: int, span_bytes: int
) -> list[tuple[Span, TensorPlan, int, int]]:
    """Every tensor cut into spans of about ``span_bytes`` input bytes (whole steps)."""
    items = []
    for p in plans:
        if p.size == 0:
            continue
        span = max(sub, span_bytes // p.dtype.itemsize // sub * sub)
        fn = _float_span if p.acc_dtype is not None else _int_span
        for start in range(0, p.size, span):
            items.append((fn, p, start, min(p.size, start + span)))
    return items


# Work items smaller than this (input bytes, all inputs read) are bound by Python's per-call
# overhead under the GIL, not by numpy: threads only contend on them (100k tiny tensors took
# 26-35 s with two threads against 10 s with one, issue 13 item 19).
PARALLEL_ITEM_BYTES = 1 << 20


def choose_threads(
    plans: Sequence[TensorPlan],
    routing: Routing,
    requested: int,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
    span_bytes: int = SPAN_BYTES,
) -> int:
    """The worker threads a run uses: at most ``requested``, chosen from the work.

    One thread when most input bytes sit in work items under :data:`PARALLEL_ITEM_BYTES`
    (checkpoints of many tiny tensors); otherwise one per large work item, up to
    ``requested``. :func:`run` and the dry run's memory estimate both call it.

    Example:
        >>> import numpy as np
        >>> tiny = [TensorPlan(f"t{i}", np.dtype("f4"), (16,), np.dtype("f4"), np.dtype("f4"))
        ...         for i in range(1000)]
        >>> choose_threads(tiny, route([np.array([0.5, 0.5])], "last"), 8)
        1
    """
    sub = buffer_spec(plans, 1, chunk_elements).elements
    total = big = items = 0
    for _, p, start, stop in _work_items(plans, sub, span_bytes):
        reads = len(routing.used) if p.acc_dtype is not None else len(routing.int_read)
        nbytes = (stop - start) * p.dtype.itemsize * reads
        total += nbytes
        if nbytes >= PARALLEL_ITEM_BYTES:
            big += nbytes
            items += 1
    if big * 2 < total or items == 0:
        return 1
    return max(1, min(requested, items))


# -- executor ----------------------------------------------------------------------------------
def _execute(
    st: _Stream,
    items: Sequence[tuple[Span, TensorPlan, int, int]],
    threads: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Run the work items (in the calling thread when ``threads <= 1``); the bytes read."""
    total = 0
    if threads <= 1:
        for fn, p, start, stop in items:
            got = fn(st, p, start, stop)
            total += got
            if progress is not None:
                progress(got)
        return total
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="polyak-merge") as pool:
        pending = {pool.submit(fn, st, p, start, stop) for fn, p, start, stop in items}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    got = fut.result()  # re-raises a worker's exception here
                    total += got
                    if progress is not None:
                        progress(got)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return total


def run(
    readers: Sequence[Reader],
    writers: Sequence[Writer],
    weight_vectors: Sequence[np.ndarray],
    plans: Sequence[TensorPlan],
    *,
    int_policy: IntPolicy = "last",
    threads: int = 1,
    chunk_elements: int = CHUNK_ELEMENTS,
    span_bytes: int = SPAN_BYTES,
    progress: Callable[[int], None] | None = None,
    labels: Sequence[str] | None = None,
) -> RunResult:
    """Stream the weighted averages of ``readers`` into ``writers`` (one per weight vector).

    Args:
        readers: the inputs, oldest first, already checked by :func:`plan`.
        writers: one per weight vector, laid out for ``plans``.
        weight_vectors: float64 weights (already normalised as wanted), one per writer. An
            input whose weight is 0 in every vector is never read, as in
            :func:`polyak.average`; integer tensors read only the inputs the int policy
            looks at (:func:`polyak._accumulate.inputs_to_read`).
        plans: from :func:`plan`.
        int_policy: as in :func:`polyak.average`.
        threads: at most this many worker threads (:func:`choose_threads` picks from the
            work; 1 runs in the calling thread).
        chunk_elements: elements per inner chunk (cache-sized).
        span_bytes: input bytes per work item.
        progress: called with the number of input bytes read after each work item, from the
            calling thread.
        labels: names of the inputs for messages.

    Returns:
        A :class:`RunResult`: the input bytes read, the NaN/Inf elements met in the float
        tensors read and the threads used.
    """
    n = len(readers)
    ws = _check_weights(weight_vectors, n)
    if len(writers) != len(ws):
        raise ValueError(f"{len(writers)} writers for {len(ws)} weight vectors")
    st = _Stream(
        readers=readers,
        writers=writers,
        routing=route(ws, int_policy),
        spec=buffer_spec(plans, len(ws), chunk_elements),
        int_policy=int_policy,
        last_label=labels[-1] if labels is not None else f"input {n - 1}",
        local=threading.local(),
        nonfinite=[],
    )
    threads = choose_threads(
        plans, st.routing, threads, chunk_elements=chunk_elements, span_bytes=span_bytes
    )
    nread = _execute(st, _work_items(plans, st.spec.elements, span_bytes), threads, progress)
    return RunResult(nread, sum(st.nonfinite), threads)
