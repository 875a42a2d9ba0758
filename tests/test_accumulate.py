"""The one read rule, the one weighted sum and the backend layer under every average.

Values are checked against float64 numpy references computed here; the rules against the
behaviour each caller had before they shared them.
"""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
import warnings

import ml_dtypes
import numpy as np
import pytest

import polyak
from polyak import _backend, _kernel
from polyak._accumulate import ReadPlan, WeightedSum, inputs_to_read
from polyak._deprecation import renamed

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize(
    ("policy", "ints"),
    [("last", [4]), ("first", [0]), ("average", [1, 3]), ("error", [])],
)
def test_inputs_to_read_follows_the_int_policy(policy, ints):
    plan = inputs_to_read([np.array([0.0, 0.5, 0.0, 0.5, 0.0])], policy)
    assert plan == ReadPlan([1, 3], ints)
    assert plan.any == sorted(set([1, 3]) | set(ints))


def test_inputs_to_read_takes_the_union_over_weight_vectors():
    ws = [np.array([0.0, 0.0, 1.0, 0.0]), np.array([-1.0, 0.0, 0.0, 2.0])]
    assert inputs_to_read(ws, "last") == ReadPlan([0, 2, 3], [3])
    # all-zero weights: nothing is read for floats; "average" ints still need a dtype
    assert inputs_to_read([np.zeros(3)], "average") == ReadPlan([], [2])
    with pytest.raises(polyak.PolyakError, match="int_policy must be one of"):
        inputs_to_read([np.ones(2)], "mean")


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
def test_weighted_sum_matches_a_float64_reference(dtype):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(5, 7)).astype(dtype) for _ in range(4)]
    w = np.array([0.1, 0.0, 0.3, 0.6])
    coefficients, divisor = _kernel.split_weights(w)
    total = WeightedSum()
    for x, c in zip(xs, coefficients):
        total.add(x, float(c))
    got = total.result(dtype, divisor=divisor)
    ref = sum(wi * x.astype(np.float64) for wi, x in zip(w, xs))
    assert got.dtype == dtype and total.acc.dtype == np.float32
    if dtype == BF16:  # integer coefficients: the float32 sum is exact, rounded once
        np.testing.assert_array_equal(got, ref.astype(dtype))
    rtol = float(ml_dtypes.finfo(dtype).eps)
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=rtol)


def test_weight_zero_is_never_read_and_copy_is_independent():
    total = WeightedSum()
    total.add(np.full(3, np.nan), 0.0)  # not read: no NaN in the sum
    assert not total.started
    np.testing.assert_array_equal(total.copy().result(), np.zeros(3))
    total.add(np.ones(3), 2.0)
    branch = total.copy()
    branch.add(np.ones(3), 1.0)
    np.testing.assert_array_equal(total.result(), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(branch.result(), [3.0, 3.0, 3.0])


def test_weighted_sum_over_caller_buffers_allocates_nothing():
    x = np.random.default_rng(1).normal(size=_kernel.CHUNK_ELEMENTS).astype(BF16)
    acc = np.empty(x.size, np.float32)
    scratch = np.empty(x.size, np.float32)
    out = np.empty(x.size, BF16)
    total = WeightedSum(acc, scratch)
    total.add(x, 1.0)  # warm up numpy's ufunc caches
    tracemalloc.start()
    try:
        total = WeightedSum(acc, scratch)
        for c in (1.0, 2.0, 3.0):
            total.add(x, c)
        total.result(out=out, divisor=6.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096, peak  # the Python object only, no array
    assert total.acc is acc
    np.testing.assert_array_equal(out, x)  # (1 + 2 + 3) x / 6, exact


def test_weighted_sum_in_torch_and_jax_follows_the_numpy_rule():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=6).astype(np.float32) for _ in range(3)]
    ref = (xs[0] + 2.0 * xs[1].astype(np.float64) + 3.0 * xs[2]) / 6.0
    for make in (torch.from_numpy, jnp.asarray):
        total = WeightedSum(accumulate_dtype="float64")
        for x, c in zip(xs, (1.0, 2.0, 3.0)):
            total.add(make(x), c)
        assert str(total.acc.dtype).endswith("float64") or not _x64(make)
        got = total.result(make(xs[0]).dtype, divisor=6.0)
        assert type(got) is type(make(xs[0]))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)
        with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
            WeightedSum(accumulate_dtype="int8").add(make(xs[0]), 1.0)


def _x64(make):
    import jax

    return make.__module__.startswith("torch") or jax.config.jax_enable_x64


def test_backends_share_the_dtype_rules():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    numpy_be = _backend.get(np.zeros(1))
    torch_be = _backend.get(torch.zeros(1))
    jax_be = _backend.get(jnp.zeros(1))
    assert _backend.get(torch.nn.Parameter(torch.zeros(1))) is torch_be
    assert _backend.get(1.5) is numpy_be and _backend.get(np.float32(1)) is numpy_be
    for name in ("float16", "bfloat16", "float32", "float64", "complex64", "int8", "bool"):
        want = numpy_be.kind(np.dtype(name))
        assert torch_be.kind(getattr(torch, name)) == want, name
        assert jax_be.kind(getattr(jnp, name)) == want, name
        if want in ("float", "complex"):
            for requested in (None, "float64"):
                acc = np.dtype(numpy_be.acc_dtype(np.dtype(name), requested)).name
                assert (
                    torch_be.dtype_name(torch_be.acc_dtype(getattr(torch, name), requested)) == acc
                )
    assert torch_be.kind(torch.quint8) == "other"
    # the complex rule (soup used to call complex leaves "float")
    assert torch_be.kind(torch.complex64) == jax_be.kind(jnp.complex64) == "complex"


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_int_average_rounds_half_to_even_and_clips_in_every_library(library):
    values = [np.array([127, -128, 1, 2], np.int8), np.array([127, -128, 2, 2], np.int8)]
    if library == "torch":
        torch = pytest.importorskip("torch")
        xs = [torch.from_numpy(v) for v in values]
    elif library == "jax":
        jnp = pytest.importorskip("jax.numpy")
        xs = [jnp.asarray(v) for v in values]
    else:
        xs = values
    be = _backend.get(xs[0])
    got = be.combine_ints(xs, np.array([1.5, 1.5]), "average", "here")
    np.testing.assert_array_equal(np.asarray(got), [127, -128, 4, 6])  # 381, -384 clipped
    assert str(got.dtype).endswith("int8")
    with pytest.raises(polyak.DtypeError, match=r"here: .*int_policy='error'"):
        be.combine_ints(xs, np.array([0.5, 0.5]), "error", "here")


def test_finding_a_backend_imports_no_framework():
    code = (
        "import sys, numpy as np\n"
        "from polyak import _backend\n"
        "for x in (np.ones(2), 1.0, [1, 2], np.float32(1), object()):\n"
        "    _backend.get(x)\n"
        "heavy = [m for m in ('torch', 'jax', 'cupy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_renamed_keyword_warns_forwards_and_refuses_both():
    @renamed(old="new")
    def f(x, *, new=0):
        return x + new

    with pytest.warns(DeprecationWarning, match=r"f\(\): the keyword old= is deprecated.*new="):
        assert f(1, old=2) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(1, new=2) == 3
    with pytest.raises(polyak.PolyakError, match="both old= and new="):
        f(1, old=2, new=3)
