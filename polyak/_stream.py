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
from typing import Protocol

import numpy as np

from polyak import _kernel
from polyak._errors import DtypeError, EmptyInputError, StructureError, WeightsError

__all__ = [
    "Reader",
    "Writer",
    "TensorPlan",
    "plan",
    "run",
    "buffer_bytes",
    "int_inputs",
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
    out_dtype: np.dtype | None = None,
    int_policy: str = "last",
    accumulate_dtype: np.dtype | str | None = None,
) -> list[TensorPlan]:
    """Check that all inputs match the first and say how each tensor will be merged.

    Args:
        readers: the inputs, oldest first.
        labels: a name for each input, used in error messages (its path).
        out_dtype: cast float tensors to this dtype (None keeps the input dtype).
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
    problems: list[str] = []
    for label, reader in zip(labels[1:], readers[1:], strict=True):
        keys = list(reader.keys())
        missing = sorted(set(names) - set(keys))
        extra = sorted(set(keys) - set(names))
        shapes: list[str] = []
        dtypes: list[str] = []
        for name in names:
            if name in missing:
                continue
            dtype, shape = reader.info(name)
            rdtype, rshape = ref_info[name]
            if tuple(shape) != tuple(rshape):
                shapes.append(f"{name!r} {tuple(shape)} != {tuple(rshape)}")
            if np.dtype(dtype) != np.dtype(rdtype):
                dtypes.append(f"{name!r} {np.dtype(dtype)} != {np.dtype(rdtype)}")
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
    plans = []
    for name in names:
        dtype, shape = ref_info[name]
        dtype = np.dtype(dtype)
        kind = _kernel.dtype_kind(dtype)
        where = f"{labels[0]}: tensor {name!r}"
        if kind == "int":
            if int_policy == "error":
                _kernel.combine_ints([np.zeros(0, dtype)], np.ones(1), "error", where)
            plans.append(TensorPlan(name, dtype, tuple(shape), dtype, None))
        elif kind in ("float", "complex"):
            acc = _kernel.accumulator_dtype(dtype, accumulate_dtype)
            # out_dtype is a float type: complex tensors keep their own dtype.
            out = np.dtype(out_dtype) if out_dtype is not None and kind == "float" else dtype
            plans.append(TensorPlan(name, dtype, tuple(shape), out, acc))
        else:
            raise DtypeError(f"{where}: dtype {dtype} cannot be averaged")
    return plans


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


def int_inputs(weight_vectors: Sequence[np.ndarray], n: int, int_policy: str) -> list[int]:
    """The inputs an integer/bool tensor is read from: the newest for ``"last"``, the oldest
    for ``"first"``, and for ``"average"`` those with a nonzero weight in some vector (the
    newest alone when there are none: it gives the dtype of the all-zero result)."""
    if int_policy == "last":
        return [n - 1]
    if int_policy == "first":
        return [0]
    used = [i for i in range(n) if any(w[i] != 0 for w in weight_vectors)]
    return used or [n - 1]


def _sub_elements(plans: Sequence[TensorPlan], chunk_elements: int) -> int:
    sub = max(1, min(chunk_elements, max((p.size for p in plans), default=1)))
    return sub + sub % 2  # even, so that spans of packed F4 values cover whole bytes


def buffer_bytes(
    plans: Sequence[TensorPlan], n_inputs: int, n_outputs: int, chunk_elements: int
) -> int:
    """Bytes of buffers one thread holds: an input slice, a scratch, an accumulator and an
    output slice per output (ints: one slice per input, within the same budget)."""
    sub = _sub_elements(plans, chunk_elements)
    acc_item = max((p.acc_dtype.itemsize for p in plans if p.acc_dtype is not None), default=0)
    in_item = max((p.dtype.itemsize for p in plans), default=0)
    out_item = max((p.out_dtype.itemsize for p in plans), default=0)
    floats = sub * (in_item + acc_item * (1 + n_outputs) + out_item)
    ints = sub * (in_item + 8 + out_item) * 2  # combine_ints' float64 sum and its result
    return max(floats, ints)


def run(
    readers: Sequence[Reader],
    writers: Sequence[Writer],
    weight_vectors: Sequence[np.ndarray],
    plans: Sequence[TensorPlan],
    *,
    int_policy: str = "last",
    threads: int = 1,
    chunk_elements: int = CHUNK_ELEMENTS,
    span_bytes: int = SPAN_BYTES,
    progress: Callable[[int], None] | None = None,
    labels: Sequence[str] | None = None,
) -> int:
    """Stream the weighted averages of ``readers`` into ``writers`` (one per weight vector).

    Args:
        readers: the inputs, oldest first, already checked by :func:`plan`.
        writers: one per weight vector, laid out for ``plans``.
        weight_vectors: float64 weights (already normalised as wanted), one per writer. An
            input whose weight is 0 in every vector is never read, as in
            :func:`polyak.average`; integer tensors read only the inputs of
            :func:`int_inputs`.
        plans: from :func:`plan`.
        int_policy: as in :func:`polyak.average`.
        threads: worker threads (1 runs in the calling thread).
        chunk_elements: elements per inner chunk (cache-sized).
        span_bytes: input bytes per work item.
        progress: called with the number of input bytes read after each work item, from the
            calling thread.
        labels: names of the inputs for messages.

    Returns:
        The number of input bytes read.
    """
    n = len(readers)
    ws = _check_weights(weight_vectors, n)
    if len(writers) != len(ws):
        raise ValueError(f"{len(writers)} writers for {len(ws)} weight vectors")
    labels = list(labels) if labels is not None else [f"input {i}" for i in range(n)]
    # Exactly as polyak.average: rational weights become small integer coefficients and one
    # division at the end; inputs whose coefficient is 0 are never read.
    split = [_kernel.split_weights(w) for w in ws]
    divisors = [d for _, d in split]
    # Per output, the inputs it reads, and per input, the outputs it feeds.
    active = [[(i, float(c[i])) for i in range(n) if c[i] != 0] for c, _ in split]
    feeds: list[list[tuple[int, float, bool]]] = [[] for _ in range(n)]
    for k, act in enumerate(active):
        for j, (i, wi) in enumerate(act):
            feeds[i].append((k, wi, j == 0))
    used_inputs = [i for i in range(n) if feeds[i]]
    sub = _sub_elements(plans, chunk_elements)
    local = threading.local()

    def buffers() -> dict[str, np.ndarray]:
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            acc_item = max(
                (p.acc_dtype.itemsize for p in plans if p.acc_dtype is not None), default=8
            )
            in_item = max((p.dtype.itemsize for p in plans), default=8)
            out_item = max((p.out_dtype.itemsize for p in plans), default=8)
            bufs = {
                "in": np.empty(sub * in_item, np.uint8),
                "out": np.empty(sub * out_item, np.uint8),
                "scratch": np.empty(sub * acc_item, np.uint8),
                "acc": [np.empty(sub * acc_item, np.uint8) for _ in ws],
            }
            local.bufs = bufs
        return bufs

    def float_span(p: TensorPlan, start: int, stop: int) -> int:
        bufs = buffers()
        acc_dtype = np.dtype(p.acc_dtype)
        nread = 0
        for s in range(start, stop, sub):
            m = min(sub, stop - s)
            x = bufs["in"][: m * p.dtype.itemsize].view(p.dtype)
            scratch = bufs["scratch"][: m * acc_dtype.itemsize].view(acc_dtype)
            accs = [a[: m * acc_dtype.itemsize].view(acc_dtype) for a in bufs["acc"]]
            for i in used_inputs:
                readers[i].read(p.name, s, x)
                nread += x.nbytes
                for k, wi, first in feeds[i]:
                    _kernel.accumulate(accs[k], x, wi, scratch, first=first)
            for k, acc in enumerate(accs):
                if not active[k]:
                    acc[...] = 0
                if p.out_dtype == acc_dtype:
                    _kernel.finalize(acc, acc, divisors[k])
                    writers[k].write(p.name, s, acc)
                else:
                    out = bufs["out"][: m * p.out_dtype.itemsize].view(p.out_dtype)
                    _kernel.finalize(acc, out, divisors[k])
                    writers[k].write(p.name, s, out)
        return nread

    # Integer tensors read only the inputs the policy looks at (the newest for "last"), as
    # polyak.average's result depends on no other; the weights follow the inputs read.
    int_read = int_inputs(ws, n, int_policy)
    int_ws = [w[int_read] for w in ws]

    def int_span(p: TensorPlan, start: int, stop: int) -> int:
        # One slice per input read, so the slices shrink as N grows and memory stays bounded.
        step = max(1, sub // len(int_read))
        where = f"{labels[-1]}: tensor {p.name!r}"
        nread = 0
        for s in range(start, stop, step):
            m = min(step, stop - s)
            xs = []
            for i in int_read:
                x = np.empty(m, p.dtype)
                readers[i].read(p.name, s, x)
                nread += x.nbytes
                xs.append(x)
            for k, w in enumerate(int_ws):
                out = _kernel.combine_ints(xs, w, int_policy, where)
                writers[k].write(p.name, s, np.asarray(out, p.out_dtype))
        return nread

    items = []
    for p in plans:
        if p.size == 0:
            continue
        span = max(sub, span_bytes // p.dtype.itemsize // sub * sub)
        fn = float_span if p.acc_dtype is not None else int_span
        for start in range(0, p.size, span):
            items.append((fn, p, start, min(p.size, start + span)))

    total = 0
    if threads <= 1:
        for fn, p, start, stop in items:
            got = fn(p, start, stop)
            total += got
            if progress is not None:
                progress(got)
        return total
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="polyak-merge") as pool:
        pending = {pool.submit(fn, p, start, stop) for fn, p, start, stop in items}
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
