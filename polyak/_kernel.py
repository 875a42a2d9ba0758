"""The numeric kernel every numpy average in polyak goes through.

``polyak.average``, the online averager's numpy path and the streaming checkpoint merge all
accumulate ``w_i * x_i`` with :func:`accumulate`, chunk by chunk, and round once with
:func:`finalize`. Sharing the kernel is what makes a streamed merge equal the in-memory
average bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import ml_dtypes
import numpy as np

from polyak._errors import DtypeError, PolyakError

__all__ = [
    "CHUNK_ELEMENTS",
    "INT_POLICIES",
    "accumulator_dtype",
    "split_weights",
    "accumulate",
    "finalize",
    "combine_ints",
    "round_to_int",
    "check_int_policy",
    "int_policy_error",
    "dtype_kind",
    "is_scale",
    "SATURATING",
    "all_finite",
]

# 64 Ki elements: an accumulator, a scratch buffer and one input chunk (256 KiB each in
# float32) stay in L2 while every snapshot streams through them.
CHUNK_ELEMENTS = 1 << 16

INT_POLICIES = ("last", "first", "error", "average")

_ML_FLOATS = frozenset(
    np.dtype(getattr(ml_dtypes, name))
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e4m3b11fnuz",
        "float8_e4m3",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e3m4",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
    )
    if hasattr(ml_dtypes, name)
)
_ML_INTS = frozenset(
    np.dtype(getattr(ml_dtypes, name))
    for name in ("int2", "int4", "uint2", "uint4")
    if hasattr(ml_dtypes, name)
)


# Power-of-two scales (MX block scales): an arithmetic mean of exponents means little, so
# they follow int_policy like step counters; "average" casts the float64 mean back.
_ML_SCALES = frozenset(
    np.dtype(getattr(ml_dtypes, name)) for name in ("float8_e8m0fnu",) if hasattr(ml_dtypes, name)
)


def is_scale(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is a power-of-two scale type (``float8_e8m0fnu``): kind ``"int"``,
    but an average is cast back from float64 as is, with no integer rounding or clipping."""
    try:
        return np.dtype(dtype) in _ML_SCALES
    except TypeError:
        return False


def dtype_kind(dtype: np.dtype) -> str:
    """``"float"``, ``"complex"``, ``"int"`` (ints, bools, e8m0 scales) or ``"other"``."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype in _ML_FLOATS:
        return "float"
    if dtype.kind == "c":
        return "complex"
    if dtype.kind in "iub" or dtype in _ML_INTS or dtype in _ML_SCALES:
        return "int"
    return "other"


def accumulator_dtype(dtype: np.dtype, requested: np.dtype | str | None = None) -> np.dtype:
    """The dtype an average of ``dtype`` leaves accumulates in.

    float16, bfloat16, float8 and float32 accumulate in float32; float64 in float64; complex
    in at least complex64. ``requested`` may raise that (``"float64"``), never lower it.

    Raises:
        DtypeError: ``dtype`` is not a floating or complex type, or ``requested`` is not.
    """
    dtype = np.dtype(dtype)
    kind = dtype_kind(dtype)
    if kind == "float":
        # ml_dtypes' small floats (bf16, fp8) are kind "V" and promote poorly: take float32.
        base = np.promote_types(dtype, np.float32) if dtype.kind == "f" else np.dtype(np.float32)
    elif kind == "complex":
        base = np.promote_types(dtype, np.complex64)
    else:
        raise DtypeError(f"cannot accumulate dtype {dtype}: not a floating-point type")
    if requested is None:
        return base
    try:
        req = np.dtype(requested)
    except TypeError:
        raise DtypeError(f"accumulate_dtype={requested!r} is not a dtype") from None
    if req.kind not in "fc":
        raise DtypeError(f"accumulate_dtype must be a float or complex dtype, got {req}")
    return np.promote_types(base, req)


# Integer coefficients up to 2**20 keep w_i * x_i exact for bf16/fp16 inputs in float32
# and leave room for values up to ~1e32 before float32 overflows.
_MAX_DIVISOR = 1 << 20


def split_weights(weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Write normalized weights as ``coefficients / divisor`` with small integer coefficients.

    Rational schedules (equal, linear, tail, swa, ...) have weights like 1/10 that no
    binary float holds exactly. Accumulating ``1 * x_i`` and dividing once at the end keeps
    the sum exact for bf16/fp16 inputs, so an average that lands exactly halfway between two
    bf16 values (common: a few percent of elements for 10 bf16 snapshots) rounds half to
    even, as the exact result does, instead of by the noise of ``0.1 * x``. Weights with no
    small common denominator (exponential, EMA) come back unchanged with divisor 1.

    Returns:
        ``(coefficients, divisor)`` with ``coefficients / divisor == weights`` to float64
        rounding.
    """
    w = np.asarray(weights, dtype=np.float64)
    divisor = 1
    for x in w.tolist():
        f = Fraction(x).limit_denominator(_MAX_DIVISOR)
        if abs(float(f) - x) > 4e-16 * abs(x):
            return w, 1.0
        divisor = math.lcm(divisor, f.denominator)
        if divisor > _MAX_DIVISOR:
            return w, 1.0
    coefficients = np.rint(w * divisor)
    if np.any(np.abs(coefficients / divisor - w) > 4e-16 * np.abs(w)) or np.any(
        np.abs(coefficients) > _MAX_DIVISOR
    ):
        return w, 1.0
    return coefficients, float(divisor)


def accumulate(
    acc: np.ndarray, x: np.ndarray, w: float, scratch: np.ndarray, *, first: bool
) -> None:
    """``acc = w * x`` (``first``) or ``acc += w * x``, computed in ``acc.dtype``.

    ``x`` may be any float dtype (bf16 and fp8 included): it is cast up to ``acc.dtype``
    before the multiply, so a low-precision product is never rounded. ``scratch`` has the
    shape and dtype of ``acc`` (it may be ``acc`` itself when ``first``); no memory is
    allocated.
    """
    if x.dtype != acc.dtype:
        # Cast into a buffer we own: a ufunc given a mixed-dtype operand allocates a
        # conversion buffer on every call, and is no faster than this exact up-cast.
        target = acc if first else scratch
        np.copyto(target, x, casting="same_kind")
        x = target
    wt = acc.dtype.type(w)
    if first:
        if x is acc:
            if w != 1.0:
                np.multiply(acc, wt, out=acc)
        elif w == 1.0:
            np.copyto(acc, x)
        else:
            np.multiply(x, wt, out=acc)
    elif w == 1.0:
        # Equal-weight merges (equal, tail, swa) have unit coefficients: 1 * x is exact,
        # so skip the multiply.
        np.add(acc, x, out=acc)
    else:
        np.multiply(x, wt, out=scratch)
        np.add(acc, scratch, out=acc)


def _no_infinity(dtype: np.dtype) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isnan(np.array(np.inf, np.float32).astype(dtype)))


# Small floats with no infinity (float8_e4m3fn, the fnuz formats): ml_dtypes turns a value
# past the largest into NaN; torch's float8_e4m3fn cast saturates to +-448. Saturate, as
# torch does, so that a large weight is clipped rather than destroyed.
SATURATING = frozenset(dt for dt in _ML_FLOATS if dt.itemsize == 1 and _no_infinity(dt))


def finalize(acc: np.ndarray, out: np.ndarray, divisor: float = 1.0) -> None:
    """Divide by ``divisor`` (see :func:`split_weights`), then round once into ``out``.

    ``out`` may be ``acc`` itself (float32 and float64 leaves accumulate in place). Into a
    float8 type with no infinity (:data:`SATURATING`, e.g. float8_e4m3fn), values past its
    largest finite value, infinities included, saturate to it (NaN stays NaN), as torch's
    cast does.
    """
    if divisor != 1.0:
        np.divide(acc, acc.dtype.type(divisor), out=acc)
    if out is not acc:
        if out.dtype in SATURATING:
            top = float(ml_dtypes.finfo(out.dtype).max)
            np.clip(acc, -top, top, out=acc)
        np.copyto(out, acc, casting="unsafe")


def all_finite(acc: np.ndarray) -> bool:
    """Whether every element of a float or complex accumulator is finite, without
    allocating: a max and a min reduction (NaN propagates through both), about half the
    cost of one add over the chunk."""
    if acc.size == 0:
        return True
    if acc.dtype.kind == "c":
        return all_finite(acc.real) and all_finite(acc.imag)
    return bool(np.isfinite(np.maximum.reduce(acc)) and np.isfinite(np.minimum.reduce(acc)))


def check_int_policy(policy: str) -> str:
    """Validate an ``int_policy`` argument."""
    if policy not in INT_POLICIES:
        raise PolyakError(f"int_policy must be one of {INT_POLICIES}, got int_policy={policy!r}")
    return policy


def int_policy_error(where: str, dtype: object) -> DtypeError:
    """The error for an int/bool leaf under ``int_policy="error"``, naming ``where``."""
    return DtypeError(
        f"{where}: {dtype} leaf cannot be averaged with int_policy='error' "
        "(use 'last', 'first' or 'average')"
    )


def combine_ints(
    arrays: Sequence[np.ndarray], weights: np.ndarray, policy: str, where: str
) -> np.ndarray:
    """Combine integer or bool leaves (step counters, masks) by ``policy``.

    ``"last"`` and ``"first"`` copy the newest or oldest; ``"average"`` takes the weighted
    mean in float64, rounds half to even and clips to the dtype's range (64-bit ints average
    their distances from the newest input, so equal inputs give themselves exactly, even
    INT64_MAX); ``"error"`` refuses.

    Raises:
        DtypeError: with ``policy="error"``, naming ``where``.
    """
    if policy == "last":
        return np.array(arrays[-1], copy=True)
    if policy == "first":
        return np.array(arrays[0], copy=True)
    dtype = np.asarray(arrays[-1]).dtype
    if policy == "error":
        raise int_policy_error(where, dtype)
    if dtype.kind in "iu" and dtype.itemsize == 8:
        return _average_int64(arrays, weights, dtype)
    acc = np.zeros(np.shape(arrays[-1]), dtype=np.float64)
    for a, w in zip(arrays, weights):
        if w != 0:
            acc += w * np.asarray(a, dtype=np.float64)
    return round_to_int(acc, dtype)


def round_to_int(acc: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float average of int or bool leaves as a new ``dtype`` array: rounded half to even
    and saturated at the dtype's range (bool: nonzero; e8m0 scales: cast back as is).

    Example:
        >>> round_to_int(np.array([2.5, 3.5, 1e30]), np.dtype(np.int64))
        array([                  2,                   4, 9223372036854775807])
    """
    dtype = np.dtype(dtype)
    if is_scale(dtype):
        return acc.astype(dtype)
    rounded = np.asarray(np.rint(acc))
    if dtype.kind == "b":
        return rounded != 0
    info = np.iinfo(dtype)
    # Saturate by comparing in float: int64's max is 2**63 in float64, which a clip would
    # keep and the cast then wrap to the minimum.
    high, low = rounded >= float(info.max), rounded <= float(info.min)
    out = np.where(high | low, 0.0, rounded).astype(dtype)
    out = np.where(high, np.asarray(info.max, dtype), out)
    return np.where(low, np.asarray(info.min, dtype), out)


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a - b`` of two int64 or uint64 arrays as float64, with no int overflow: the
    magnitude ``max - min`` is exact in uint64 arithmetic modulo 2**64, whatever the signs."""
    ua, ub = a.astype(np.uint64), b.astype(np.uint64)  # two's complement for int64
    up = a >= b
    mag = np.where(up, ua - ub, ub - ua)
    return np.where(up, mag.astype(np.float64), -mag.astype(np.float64))


def _average_int64(arrays: Sequence[np.ndarray], weights: np.ndarray, dtype: np.dtype):
    """The weighted mean of 64-bit ints, exact where float64 cannot hold the values.

    float64 holds ints only up to 2**53: the mean of INT64_MAX with itself rounded to 2**63
    and wrapped to INT64_MIN. Average the distances from the newest input instead (small
    when the inputs agree, exactly 0 when they are equal), round, and add back in uint64
    arithmetic, saturating at the dtype's range.
    """
    ref = np.asarray(arrays[-1], dtype)
    bracket = np.zeros(ref.shape, np.float64)
    total = 0.0
    for a, w in zip(arrays, weights):
        if w != 0:
            bracket += w * _distance(np.asarray(a, dtype), ref)
            total += float(w)
    if total != 1.0:  # sum(w * a) = ref * sum(w) + sum(w * (a - ref))
        bracket += (total - 1.0) * ref.astype(np.float64)
    np.rint(bracket, out=bracket)
    info = np.iinfo(dtype)
    uref = ref.astype(np.uint64)
    # Room to the dtype's top and bottom, exact as uint64 distances.
    room_up = np.uint64(int(info.max) % 2**64) - uref
    room_down = uref - np.uint64(int(info.min) % 2**64)
    limit = float(2**64 - 2048)  # the largest float64 below 2**64
    step = np.minimum(np.abs(bracket), limit).astype(np.uint64)
    big = np.abs(bracket) > limit
    up = bracket >= 0
    out = np.where(up, uref + step, uref - step)  # wraps only where it saturates below
    out = np.where(up & (big | (step > room_up)), np.uint64(int(info.max) % 2**64), out)
    out = np.where(~up & (big | (step > room_down)), np.uint64(int(info.min) % 2**64), out)
    return out.astype(dtype)
