"""One small class per array library: every library-specific decision, made once.

Callers ask :func:`get` for a leaf's backend and call its methods; they never test which
library a leaf comes from. Each backend owns

* the dtype-kind rule (:meth:`Backend.kind`: float, complex, int for ints, bools and e8m0
  power-of-two scales, other);
* the accumulator-dtype rule (:meth:`Backend.acc_dtype`), decided on numpy dtypes by
  :func:`polyak._kernel.accumulator_dtype` for every library, so ``accumulate_dtype`` is
  validated and honoured everywhere;
* the int policy, with rounding half to even and clipping to the dtype's range;
* placement (library and device), copies, folds and conversions to and from numpy.

Design, after einops' ``_backends.py``: a backend is found by the leaf's type, and a
framework is only considered once it is in ``sys.modules``: a torch tensor cannot exist
before torch is imported, so asking never imports a framework. The answer is cached per
type. numpy arrays, numpy scalars and Python numbers take polyak's numpy kernel
(:mod:`polyak._kernel`), so numpy results stay bit for bit what the kernel gives; torch has
its own class (in-place ``lerp_`` folds; the place for a ``torch._foreach`` fast path,
:meth:`Backend.fold_many`); any other array-API library (JAX, CuPy) is computed in its own
namespace through array-api-compat, functionally, as JAX arrays are immutable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from polyak import _kernel
from polyak._errors import DtypeError
from polyak._kernel import int_policy_error

__all__ = ["Backend", "NumpyBackend", "TorchBackend", "get", "int_policy_error", "dtype_name"]


def dtype_name(dtype: Any) -> str:
    """``"bfloat16"`` for numpy's, ml_dtypes', JAX's and torch's bfloat16 alike."""
    return str(dtype).removeprefix("torch.")


class Backend:
    """What polyak needs from an array library; the base class is the array-API one."""

    name = "array-api"

    def __init__(self, xp: ModuleType | None = None) -> None:
        self.xp = xp

    # --- dtypes -------------------------------------------------------------------------

    def np_dtype(self, dtype: Any) -> np.dtype:
        """The numpy (or ml_dtypes) dtype of the same name; raises TypeError if none."""
        return np.dtype(dtype)

    def from_np_dtype(self, dtype: np.dtype) -> Any:
        """The library's dtype for a numpy float or complex dtype."""
        if dtype == np.float64 or dtype == np.complex128:
            wide = self.widest_float()
            if wide != self.xp.float64:  # JAX without jax_enable_x64 has no 64-bit types
                return wide if dtype == np.float64 else self.xp.complex64
        return getattr(self.xp, np.dtype(dtype).name)

    def kind(self, dtype: Any) -> str:
        """``"float"``, ``"complex"``, ``"int"`` (ints, bools and ``float8_e8m0fnu`` scales,
        which follow the int policy) or ``"other"``."""
        try:
            return _kernel.dtype_kind(self.np_dtype(dtype))
        except TypeError:
            return "other"

    def is_scale(self, dtype: Any) -> bool:
        """Whether ``dtype`` is ``float8_e8m0fnu`` (see :func:`polyak._kernel.is_scale`)."""
        try:
            return _kernel.is_scale(self.np_dtype(dtype))
        except TypeError:
            return False

    def acc_dtype(self, dtype: Any, requested: Any = None) -> Any:
        """The dtype a float/complex average of ``dtype`` leaves accumulates in.

        Raises:
            DtypeError: ``dtype`` is not float/complex, or ``requested`` is not a float or
                complex dtype.
        """
        try:
            np_dtype = self.np_dtype(dtype)
        except TypeError:
            raise DtypeError(f"cannot accumulate dtype {dtype}: not a number type") from None
        return self.from_np_dtype(_kernel.accumulator_dtype(np_dtype, requested))

    def int_acc_dtype(self) -> Any:
        """The dtype int/bool leaves are averaged in (``int_policy="average"``)."""
        return self.widest_float()

    def widest_float(self) -> Any:
        """float64 where the library has it; JAX without ``jax_enable_x64`` has float32."""
        xp = self.xp
        if array_api_compat.is_jax_namespace(xp):
            jax = sys.modules["jax"]  # imported: a JAX array exists
            if not jax.config.jax_enable_x64:
                return xp.float32
        return xp.float64

    def result_type(self, dtypes: Sequence[Any]) -> Any:
        """The common dtype of ``dtypes``; raises TypeError when there is none."""
        return self.xp.result_type(*dtypes)

    def dtype_name(self, dtype: Any) -> str:
        """``"bfloat16"`` for numpy's, ml_dtypes', JAX's and torch's bfloat16 alike."""
        return dtype_name(dtype)

    def dtype_from_name(self, name: str) -> Any:
        """The dtype called ``name``; raises :class:`DtypeError` if there is none."""
        try:
            return np.dtype(name)  # ml_dtypes, imported by polyak._kernel, registers bfloat16
        except TypeError:
            raise DtypeError(f"unknown dtype {name!r}") from None

    # --- arrays -------------------------------------------------------------------------

    def as_array(self, leaf: Any) -> Any:
        """The leaf as an array of this library (torch tensors detached)."""
        return leaf

    def placement(self, x: Any) -> Any:
        """What must not change between snapshots: the array type (and torch's device)."""
        return type(x)

    def describe(self, x: Any) -> str:
        """The array type for messages, e.g. ``jaxlib.ArrayImpl``."""
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__}"

    def copy(self, x: Any, dtype: Any = None) -> Any:
        """A private, contiguous copy of ``x`` (cast to ``dtype``, if given)."""
        if dtype is None:
            return self.xp.asarray(x, copy=True)
        return self.xp.astype(x, dtype, copy=True)

    def zeros(self, like: Any, dtype: Any) -> Any:
        """Zeros of ``like``'s shape and device, of ``dtype``."""
        return self.xp.zeros_like(like, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """``x`` as a numpy array (copied to the host)."""
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        """``a`` in this library, on the device of ``like``."""
        return self.xp.asarray(a, device=array_api_compat.device(like))

    # --- arithmetic ---------------------------------------------------------------------

    def weighted_add(self, acc: Any, x: Any, w: float, scratch: Any, *, first: bool) -> Any:
        """``w * x`` (``first``) or ``acc + w * x`` in ``acc``'s dtype; returns the sum.

        numpy writes into ``acc`` (``scratch``: a buffer like it); the other libraries return
        a new array and leave ``acc`` alone, so copies of a sum may share arrays.
        """
        term = self.xp.astype(x, acc.dtype) * float(w)
        return term if first else acc + term

    def scaled(self, x: Any, w: float, dtype: Any) -> Any:
        """A new accumulator of ``dtype`` holding ``w * x``."""
        return self.xp.astype(x, dtype) * float(w)

    def divide(self, acc: Any, divisor: float) -> Any:
        """``acc / divisor`` (a new array, except with numpy)."""
        return acc / divisor if divisor != 1.0 else acc

    def fold(self, acc: Any, x: Any, decay: float, workspace: dict[Any, Any]) -> Any:
        """``decay * acc + (1 - decay) * x`` for a float accumulator; returns the new one."""
        xp = self.xp
        if decay == 0.0:  # e.g. swa before its start: the average is the newest snapshot
            return xp.astype(x, acc.dtype, copy=True)
        return decay * acc + (1.0 - decay) * xp.astype(x, acc.dtype)

    def fold_many(
        self, accs: list[Any], xs: list[Any], decay: float, workspace: dict[Any, Any]
    ) -> list[Any]:
        """:meth:`fold` over many leaves: the hook for a fused multi-tensor update."""
        return [self.fold(acc, x, decay, workspace) for acc, x in zip(accs, xs)]

    def keep_int(self, acc: Any, x: Any) -> Any:
        """The newest int/bool leaf in place of ``acc`` (``int_policy="last"`` online)."""
        return self.xp.asarray(x, copy=True)

    def cast(self, acc: Any, dtype: Any) -> Any:
        """A new array of ``dtype`` from an accumulator: float to int/bool is rounded half to
        even and clipped to the dtype's range, as :func:`polyak.average` does."""
        if self.kind(dtype) == "int" and self.kind(acc.dtype) == "float":
            return self.round_clip(acc, dtype)
        return self.copy(acc, dtype)

    def round_clip(self, acc: Any, dtype: Any) -> Any:
        """A new ``dtype`` array of ``acc`` (a float average of int or bool leaves) rounded
        half to even and saturated at the dtype's range (bool: nonzero; e8m0 scales: the
        mean cast back as is, as :func:`polyak._kernel.combine_ints` does)."""
        xp = self.xp
        if self.is_scale(dtype):
            return xp.astype(acc, dtype)
        rounded = xp.round(acc)  # the array API rounds half to even
        if dtype == xp.bool:
            return rounded != 0
        info = xp.iinfo(dtype)
        # Saturate by comparing in float: int64's max is 2**63 in float64, which a clip in
        # float keeps and the cast then wraps to the minimum.
        out = xp.astype(xp.clip(rounded, info.min, info.max), dtype)
        out = xp.where(rounded >= float(info.max), xp.asarray(info.max, dtype=dtype), out)
        return xp.where(rounded <= float(info.min), xp.asarray(info.min, dtype=dtype), out)

    def combine_ints(self, xs: Sequence[Any], w: np.ndarray, policy: str, where: str) -> Any:
        """Combine int/bool leaves by the int policy (see :func:`_kernel.combine_ints`).

        Raises:
            DtypeError: with ``policy="error"``, naming ``where``.
        """
        if policy == "last":
            return self.copy(xs[-1])
        if policy == "first":
            return self.copy(xs[0])
        if policy == "error":
            raise int_policy_error(where, xs[-1].dtype)
        wide = self.int_acc_dtype()
        acc = self.zeros(xs[-1], wide)
        for x, wi in zip(xs, w):
            if wi != 0:
                acc = acc + float(wi) * self.xp.astype(x, wide)
        return self.round_clip(acc, xs[-1].dtype)


class NumpyBackend(Backend):
    """numpy arrays, numpy scalars and Python numbers, through :mod:`polyak._kernel`."""

    name = "numpy"

    def __init__(self) -> None:
        super().__init__(np)

    def from_np_dtype(self, dtype: np.dtype) -> Any:
        return np.dtype(dtype)

    def widest_float(self) -> Any:
        return np.dtype(np.float64)

    def result_type(self, dtypes: Sequence[Any]) -> Any:
        return np.result_type(*dtypes)

    def as_array(self, leaf: Any) -> Any:
        return np.asarray(leaf)

    def copy(self, x: Any, dtype: Any = None) -> Any:
        return np.array(x, dtype=dtype, order="C", copy=True)

    def zeros(self, like: Any, dtype: Any) -> Any:
        return np.zeros(np.shape(like), dtype=dtype)

    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        return np.array(a, order="C", copy=True)  # loaded arrays may be read-only maps

    def weighted_add(self, acc: Any, x: Any, w: float, scratch: Any, *, first: bool) -> Any:
        _kernel.accumulate(acc, x, w, scratch, first=first)
        return acc

    def scaled(self, x: Any, w: float, dtype: Any) -> Any:
        acc = np.empty(np.shape(x), dtype=dtype)
        _kernel.accumulate(acc, x, w, acc, first=True)
        return acc

    def divide(self, acc: Any, divisor: float) -> Any:
        _kernel.finalize(acc, acc, divisor)
        return acc

    def fold(self, acc: Any, x: Any, decay: float, workspace: dict[Any, Any]) -> Any:
        # Chunks of CHUNK_ELEMENTS keep the scaled accumulator and the weighted snapshot in
        # cache, so main memory sees one read of x and one read and write of acc.
        flat_acc = acc.reshape(-1)
        flat_x = np.ascontiguousarray(x).reshape(-1)  # copies only non-contiguous views
        if decay == 0.0:  # e.g. swa before its start: the average is the newest snapshot
            np.copyto(flat_acc, flat_x, casting="unsafe")
            return acc
        scratch = workspace.get(acc.dtype)
        if scratch is None:
            scratch = workspace[acc.dtype] = np.empty(_kernel.CHUNK_ELEMENTS, dtype=acc.dtype)
        d, weight, size = acc.dtype.type(decay), 1.0 - decay, flat_acc.size
        for start in range(0, size, _kernel.CHUNK_ELEMENTS):
            stop = min(start + _kernel.CHUNK_ELEMENTS, size)
            a = flat_acc[start:stop]
            np.multiply(a, d, out=a)
            _kernel.accumulate(a, flat_x[start:stop], weight, scratch[: stop - start], first=False)
        return acc

    def keep_int(self, acc: Any, x: Any) -> Any:
        np.copyto(acc, x)
        return acc

    def round_clip(self, acc: Any, dtype: Any) -> Any:
        return _kernel.round_to_int(acc, dtype)  # the kernel's rule, bit for bit

    def combine_ints(self, xs: Sequence[Any], w: np.ndarray, policy: str, where: str) -> Any:
        return _kernel.combine_ints(xs, w, policy, where)


class TorchBackend(Backend):
    """torch tensors, CPU or accelerator: in-place folds on the tensor's device."""

    name = "torch"

    def __init__(self) -> None:
        super().__init__(array_api_compat.array_namespace(sys.modules["torch"].empty(0)))
        self.torch = sys.modules["torch"]

    def np_dtype(self, dtype: Any) -> np.dtype:
        return np.dtype(self.dtype_name(dtype))

    def from_np_dtype(self, dtype: np.dtype) -> Any:
        return getattr(self.torch, np.dtype(dtype).name)

    def kind(self, dtype: Any) -> str:
        if dtype.is_complex:
            return "complex"
        if self.is_scale(dtype):
            return "int"  # torch calls float8_e8m0fnu floating point; polyak's rule does not
        if dtype.is_floating_point:
            return "float"
        integral = self.dtype_name(dtype).startswith(("int", "uint", "bool"))
        return "int" if integral else "other"

    def widest_float(self) -> Any:
        return self.torch.float64

    def dtype_from_name(self, name: str) -> Any:
        dtype = getattr(self.torch, str(name), None)
        if not isinstance(dtype, self.torch.dtype):
            raise DtypeError(f"unknown torch dtype {name!r}")
        return dtype

    def as_array(self, leaf: Any) -> Any:
        return leaf.detach() if leaf.requires_grad else leaf

    def placement(self, x: Any) -> Any:
        # Any torch tensor counts as one type: a frozen nn.Parameter (not detached, as it
        # needs no grad) and the plain tensor its average is kept in must match.
        return ("torch", x.device)

    def describe(self, x: Any) -> str:
        return f"torch.Tensor on {x.device}"

    def copy(self, x: Any, dtype: Any = None) -> Any:
        return x.to(dtype=dtype, memory_format=self.torch.contiguous_format, copy=True)

    def to_numpy(self, x: Any) -> np.ndarray:
        # Through the bytes: Tensor.numpy() refuses bfloat16 and the float8 types, which
        # ml_dtypes gives numpy; a CPU tensor shares its memory with the result.
        t = x.detach().cpu().contiguous()
        try:
            dtype = self.np_dtype(t.dtype)
        except TypeError:
            name = self.dtype_name(t.dtype)
            raise DtypeError(f"torch dtype {name} has no numpy equivalent") from None
        raw = t.reshape(-1).view(self.torch.uint8).numpy()
        return raw.view(dtype).reshape(tuple(t.shape))

    def from_numpy(self, a: np.ndarray, like: Any) -> Any:
        return self.torch.from_numpy(np.array(a, order="C", copy=True)).to(like.device)

    def fold_many(
        self, accs: list[Any], xs: list[Any], decay: float, workspace: dict[Any, Any]
    ) -> list[Any]:
        """:meth:`fold` over many tensors: one multi-tensor kernel per (device, dtypes) group."""
        groups: dict[tuple[Any, Any, Any], tuple[list[Any], list[Any]]] = {}
        for acc, x in zip(accs, xs):
            group = groups.setdefault((acc.device, acc.dtype, x.dtype), ([], []))
            group[0].append(acc)
            group[1].append(x)
        for group_accs, group_xs in groups.values():
            self.foreach_fold(group_accs, group_xs, decay, workspace)
        return accs

    def foreach_fold(
        self,
        accs: Sequence[Any],
        xs: Sequence[Any],
        decay: float,
        workspace: dict[Any, Any] | None = None,
    ) -> None:
        """``acc <- decay * acc + (1 - decay) * x`` in place, for lists of tensors that share
        one device, one accumulator dtype and one snapshot dtype.

        Same dtypes take one ``_foreach_lerp_``, the kernel of torch's
        ``get_ema_multi_avg_fn``, so results agree with it bit for bit. A wider accumulator
        (a float32 average of bf16 weights) on an accelerator takes ``_foreach_mul_`` and
        ``_foreach_add_``, whose kernels promote as they read; on CPU, where the arithmetic is
        memory-bound, each tensor is cast chunk by chunk into a small cache-resident scratch
        and lerped from there, which moves about half the bytes of mul + add.
        ``workspace`` keeps that scratch between calls (one per caller: not shared across
        threads).
        """
        if not accs:
            return
        torch, weight = self.torch, 1.0 - decay
        if decay == 0.0:
            torch._foreach_copy_(list(accs), list(xs))
        elif xs[0].dtype == accs[0].dtype:
            torch._foreach_lerp_(list(accs), list(xs), weight)
        elif accs[0].device.type == "cpu":
            workspace = {} if workspace is None else workspace
            for acc, x in zip(accs, xs):
                self._fold_cpu_cast(acc, x, weight, workspace)
        else:
            self.foreach_fold_device_cast(accs, xs, decay)

    def foreach_copy(
        self, dst: Sequence[Any], src: Sequence[Any], *, non_blocking: bool = False
    ) -> None:
        """``dst[i] <- src[i]`` in place for every i, casting dtype and moving device as needed."""
        if dst:
            self.torch._foreach_copy_(list(dst), list(src), non_blocking=non_blocking)

    def fold(self, acc: Any, x: Any, decay: float, workspace: dict[Any, Any]) -> Any:
        self.foreach_fold([acc], [x], decay, workspace)
        return acc

    def foreach_fold_device_cast(
        self, accs: Sequence[Any], xs: Sequence[Any], decay: float
    ) -> None:
        """The accelerator fold of snapshots narrower than their averages (bf16 into float32)."""
        # Accelerator kernels cast a mixed-dtype operand as they read it, so no temporary;
        # but torch refuses to promote float8 with anything ("Promotion for Float8 Types is
        # not supported"), so float8 snapshots are cast to the accumulator's dtype first.
        if xs[0].dtype.is_floating_point and xs[0].dtype.itemsize == 1:
            xs = [x.to(accs[0].dtype) for x in xs]
        self.torch._foreach_mul_(list(accs), decay)
        self.torch._foreach_add_(list(accs), list(xs), alpha=1.0 - decay)

    def _fold_cpu_cast(self, acc: Any, x: Any, weight: float, workspace: dict[Any, Any]) -> None:
        # On CPU, torch casts a mixed-dtype operand (a bf16 snapshot into a float32 average)
        # into a full-size temporary before the arithmetic; copy_ casts without one, so cast
        # chunk by chunk into a small scratch buffer and lerp from there.
        chunk = _kernel.CHUNK_ELEMENTS
        scratch = workspace.get(("torch", acc.dtype))
        if scratch is None:
            scratch = workspace[("torch", acc.dtype)] = self.torch.empty(chunk, dtype=acc.dtype)
        flat_acc, flat_x = acc.view(-1), x.reshape(-1)  # reshape copies only non-contiguous x
        for start in range(0, flat_acc.numel(), chunk):
            a = flat_acc[start : start + chunk]
            s = scratch[: a.numel()]
            s.copy_(flat_x[start : start + chunk])
            a.lerp_(s, weight)

    def keep_int(self, acc: Any, x: Any) -> Any:
        acc.copy_(x)
        return acc


_NUMPY = NumpyBackend()
_BY_TYPE: dict[type, Backend] = {}
_NUMPY_TYPES = (np.ndarray, np.generic, int, float, complex, bool, list, tuple)


def get(x: Any) -> Backend:
    """The backend of a leaf: numpy for numpy arrays, scalars, Python numbers and anything
    that is not an array-API array; torch; else the leaf's array-API namespace."""
    backend = _BY_TYPE.get(type(x))
    if backend is None:
        backend = _BY_TYPE[type(x)] = _find(x)
    return backend


def _find(x: Any) -> Backend:
    if isinstance(x, _NUMPY_TYPES) or not array_api_compat.is_array_api_obj(x):
        return _NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _torch_backend()
    xp = array_api_compat.array_namespace(x)
    if xp not in _BY_NAMESPACE:  # one backend per library, whatever its array types
        _BY_NAMESPACE[xp] = Backend(xp)
    return _BY_NAMESPACE[xp]


_BY_NAMESPACE: dict[ModuleType, Backend] = {}
_TORCH: list[TorchBackend] = []


def _torch_backend() -> TorchBackend:
    # One instance for every tensor type (Tensor, Parameter, subclasses).
    if not _TORCH:
        _TORCH.append(TorchBackend())
    return _TORCH[0]
