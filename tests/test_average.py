"""polyak.average: properties against plain references, structure, errors, frameworks."""

import collections
import random

import ml_dtypes
import numpy as np
import optree
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import FLOAT_DTYPES, Leaf, builtin_schedules, fill, tree_lists

import polyak
from polyak import schedules as S

BF16 = np.dtype(ml_dtypes.bfloat16)
LOW_PRECISION = {np.dtype(np.float16), BF16}


def eps(dtype):
    return float(ml_dtypes.finfo(dtype).eps)


def leaves(tree):
    return optree.tree_leaves(tree)


def reference(trees, w):
    """An independent float64 reference: np.average over the stacked leaves."""
    out = []
    for column in zip(*[leaves(t) for t in trees]):
        stacked = np.stack([np.asarray(x, dtype=np.float64) for x in column])
        out.append(np.average(stacked, axis=0, weights=w) if len(w) else stacked[0])
    return out


def ordered(x):
    """Floats of one dtype as integers in value order, so that ulp distances subtract."""
    bits = np.asarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32).astype(np.int64)
    sign = 1 << (8 * x.dtype.itemsize - 1)
    return np.where(bits & sign, -(bits & (sign - 1)), bits)


def within_one_ulp(got, ref64, magnitude):
    """Within 1 ulp of the float64 reference, or of float32 accumulation noise where the
    average cancels to (nearly) zero and ulps shrink below what any float32 sum resolves."""
    ulps = np.abs(ordered(got) - ordered(ref64.astype(got.dtype)))
    cancelled = np.abs(got.astype(np.float64) - ref64) <= 8 * 2.0**-24 * magnitude
    return np.all((ulps <= 1) | cancelled)


def assert_close_to_reference(got, ref64, dtype, magnitude):
    dtype = np.dtype(dtype)
    if dtype in LOW_PRECISION:
        assert within_one_ulp(got.astype(dtype), ref64, magnitude)
    else:
        tol = 8 * eps(dtype) * max(magnitude, 1e-30)
        np.testing.assert_allclose(got.astype(np.float64), ref64, rtol=0, atol=tol)


@given(tree_lists(), builtin_schedules())
def test_matches_float64_reference(trees, schedule):
    w = polyak.weights(schedule, len(trees))
    got = polyak.average(trees, schedule)
    for g, r, x0 in zip(leaves(got), reference(trees, w), leaves(trees[0])):
        assert g.dtype == x0.dtype and g.shape == x0.shape
        mag = max(
            (
                np.abs(np.asarray(x, np.float64)).max(initial=0)
                for x in [x0] + [leaves(t)[0] for t in trees]
            ),
            default=0,
        )
        mag = max(mag, np.abs(r).max(initial=0), 100.0)
        assert_close_to_reference(g, r, g.dtype, mag)


@given(tree_lists(min_n=1, max_n=5), st.floats(-3, 3), st.floats(-3, 3), st.data())
def test_linearity(xs, a, b, data):
    skeleton = optree.tree_map(lambda x: Leaf(x.shape, x.dtype), xs[0])
    ys = [fill(data.draw, skeleton) for _ in xs]
    schedule = data.draw(builtin_schedules())
    combo = [
        optree.tree_map(
            lambda x, y: (a * x.astype(np.float64) + b * y.astype(np.float64)).astype(x.dtype),
            x,
            y,
        )
        for x, y in zip(xs, ys)
    ]
    lhs = polyak.average(combo, schedule)
    ax, ay = polyak.average(xs, schedule), polyak.average(ys, schedule)
    for left, mx, my in zip(leaves(lhs), leaves(ax), leaves(ay)):
        rhs = a * mx.astype(np.float64) + b * my.astype(np.float64)
        scale = 100.0 * (abs(a) + abs(b)) + 1.0
        # Rounding the combined inputs to the dtype, plus one rounding of each average.
        np.testing.assert_allclose(
            left.astype(np.float64), rhs, rtol=0, atol=4 * eps(left.dtype) * scale
        )


@given(tree_lists(min_n=1, max_n=1), st.integers(1, 8), builtin_schedules())
def test_copies_of_one_tree_average_to_it(one, n, schedule):
    got = polyak.average(one * n, schedule)
    for g, x in zip(leaves(got), leaves(one[0])):
        if g.dtype in LOW_PRECISION:
            np.testing.assert_array_equal(g, x)  # float32 error is far below half an ulp
        else:
            np.testing.assert_allclose(g, x, rtol=4 * n * eps(g.dtype), atol=0)


@given(tree_lists(min_n=1, max_n=6), builtin_schedules())
def test_result_between_leafwise_min_and_max(trees, schedule):
    got = polyak.average(trees, schedule)
    for column, g in zip(zip(*[leaves(t) for t in trees]), leaves(got)):
        stacked = np.stack([np.asarray(x, np.float64) for x in column])
        tol = 2 * eps(g.dtype) * np.abs(stacked).max(initial=0)
        assert np.all(g.astype(np.float64) >= stacked.min(axis=0) - tol)
        assert np.all(g.astype(np.float64) <= stacked.max(axis=0) + tol)


@given(tree_lists(min_n=2, max_n=6), st.randoms(use_true_random=False))
def test_equal_is_permutation_invariant(trees, rnd):
    shuffled = list(trees)
    rnd.shuffle(shuffled)
    for a, b in zip(leaves(polyak.average(trees)), leaves(polyak.average(shuffled))):
        np.testing.assert_allclose(
            a.astype(np.float64),
            b.astype(np.float64),
            rtol=0,
            atol=4 * eps(a.dtype) * 100 * (1 if a.dtype not in LOW_PRECISION else 2),
        )


@given(tree_lists(min_n=1, max_n=8), st.integers(1, 8))
def test_tail_equals_equal_on_the_last_k(trees, k):
    got = polyak.average(trees, S.tail(k))
    want = polyak.average(trees[-k:], "equal")
    for a, b in zip(leaves(got), leaves(want)):
        np.testing.assert_array_equal(a, b)


@given(tree_lists(min_n=1, max_n=4))
def test_structure_dtype_and_type_preserved(trees):
    got = polyak.average(trees)
    assert optree.tree_structure(got) == optree.tree_structure(trees[0])
    for g, x in zip(leaves(got), leaves(trees[-1])):
        assert type(g) is type(x) and g.dtype == x.dtype and g.shape == x.shape


def test_typical_low_precision_data_is_correctly_rounded():
    rng = np.random.default_rng(1)
    for dtype in (BF16, np.dtype(np.float16)):
        snaps = [{"w": rng.normal(0, 0.02, size=200_000).astype(dtype)} for _ in range(10)]
        for schedule in ["equal", "linear", S.exponential(2.0), S.ema(0.9)]:
            w = polyak.weights(schedule, 10)
            got = polyak.average(snaps, schedule)["w"]
            ref = reference(snaps, w)[0]
            # np.average's float64 result carries ~1e-17 of noise, which decides exact ties
            # (a few percent of elements here) at random. float16/bfloat16 midpoints are
            # float32 numbers, so rounding through float32 first lands ties on the midpoint
            # and rounds them half to even, like the exact rational result.
            exact = np.mean(got == ref.astype(np.float32).astype(dtype))
            assert exact >= 0.999, (dtype, schedule, exact)
            assert within_one_ulp(got, ref, 0.1)


def test_containers_and_scalars():
    T = collections.namedtuple("T", "a b")
    snaps = [
        {
            "od": collections.OrderedDict([("z", np.float32(i)), ("a", [float(i), (i, 2.0 * i)])]),
            "nt": T(np.full(2, i, np.float64), None),
            "flag": np.array(i % 2 == 0),
        }
        for i in range(3)
    ]
    got = polyak.average(snaps)
    assert list(got["od"]) == ["z", "a"] and isinstance(got["od"], collections.OrderedDict)
    assert isinstance(got["od"]["z"], np.float32) and got["od"]["z"] == 1.0
    assert got["od"]["a"][0] == 1.0 and isinstance(got["od"]["a"][0], float)
    assert got["od"]["a"][1] == (2, 2.0) and isinstance(got["od"]["a"][1][0], int)
    assert isinstance(got["nt"], T) and got["nt"].b is None
    assert got["flag"].dtype == bool and bool(got["flag"]) is True


def test_int_policies():
    snaps = [
        {"step": np.array([1, 2, 3], np.int32), "b": np.array([True, False])},
        {"step": np.array([2, 3, 4], np.int32), "b": np.array([True, True])},
        {"step": np.array([4, 4, 7], np.int32), "b": np.array([False, True])},
    ]
    np.testing.assert_array_equal(polyak.average(snaps)["step"], [4, 4, 7])
    np.testing.assert_array_equal(polyak.average(snaps, int_policy="first")["step"], [1, 2, 3])
    avg = polyak.average(snaps, int_policy="average")
    # means 7/3, 3, 14/3 -> round half to even
    np.testing.assert_array_equal(avg["step"], [2, 3, 5])
    assert avg["step"].dtype == np.int32
    np.testing.assert_array_equal(avg["b"], [True, True])
    halves = polyak.average(
        [{"i": np.array([1, 3])}, {"i": np.array([2, 4])}], int_policy="average"
    )
    np.testing.assert_array_equal(halves["i"], [2, 4])  # 1.5 -> 2, 3.5 -> 4
    with pytest.raises(polyak.DtypeError, match=r"snapshots\[2\]\['b'\].*int_policy='error'"):
        polyak.average(snaps, int_policy="error")
    with pytest.raises(polyak.PolyakError, match="int_policy must be one of"):
        polyak.average(snaps, int_policy="mean")
    out = polyak.average(snaps)
    out["step"][0] = 99
    assert snaps[-1]["step"][0] == 4  # a copy, never the input itself


def test_accumulate_dtype_raises_precision():
    x = [
        np.array([1.0 + 2**-23], np.float32),
        np.array([1.0], np.float32),
        np.array([1.0], np.float32),
    ]
    w = [1e-8, 1.0, -1.0]
    lo = polyak.average(x, w, normalize=False)[0]
    hi = polyak.average(x, w, normalize=False, accumulate_dtype="float64")[0]
    assert hi.dtype == np.float32 and lo.dtype == np.float32
    assert hi == np.float32(1e-8 * (1.0 + 2**-23))
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        polyak.average(x, accumulate_dtype="int32")


def test_normalize_false_task_arithmetic():
    base = {"w": np.array([1.0, 2.0])}
    tuned = {"w": np.array([3.0, 1.0])}
    got = polyak.average([base, tuned], [-1.0, 1.0], normalize=False)
    np.testing.assert_array_equal(got["w"], [2.0, -1.0])
    with pytest.raises(polyak.WeightsError, match="sum to 0"):
        polyak.average([base, tuned], [-1.0, 1.0])


def test_non_contiguous_and_large_leaves():
    rng = np.random.default_rng(2)
    big = [rng.normal(size=(400, 700)).astype(np.float32).T for _ in range(3)]
    got = polyak.average(big, "linear")
    ref = np.average(np.stack(big).astype(np.float64), axis=0, weights=[1, 2, 3])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_zero_weight_snapshots_are_not_read():
    snaps = [{"w": np.full(3, np.nan, np.float32)}, {"w": np.ones(3, np.float32)}]
    np.testing.assert_array_equal(polyak.average(snaps, S.tail(1))["w"], np.ones(3))


@pytest.mark.parametrize(
    "params_list, kwargs, error, match",
    [
        ([], {}, polyak.EmptyInputError, "empty"),
        ({"a": 1}, {}, polyak.PolyakError, "sequence of pytrees"),
        (
            [{"a": np.zeros((25, 3))}] * 3 + [{"a": np.zeros((25, 4))}],
            {},
            polyak.ShapeError,
            r"snapshots\[3\]\['a'\]: shape \(25, 4\) != \(25, 3\)",
        ),
        (
            [{"a": 1.0, "b": 2.0}, {"a": 1.0}],
            {},
            polyak.StructureError,
            r"snapshots\[1\].*missing 1 leaves: snapshots\[1\]\['b'\]",
        ),
        (
            [{"a": 1.0}, {"a": 1.0, "c": 1.0, "d": 1.0}],
            {},
            polyak.StructureError,
            r"unexpected 2 leaves: snapshots\[1\]\['c'\], snapshots\[1\]\['d'\]",
        ),
        ([[1.0, 2.0], (1.0, 2.0)], {}, polyak.StructureError, "structure"),
        (
            [{"a": np.zeros(2)}, {"a": np.zeros(2, np.int64)}],
            {},
            polyak.DtypeError,
            r"snapshots\[1\]\['a'\]: dtype int64 \(int\) != float64 \(float\)",
        ),
        ([{"a": np.array(["x"])}] * 2, {}, polyak.DtypeError, "cannot be averaged"),
        ([{"a": 1.0}] * 3, {"schedule": [1.0, 2.0]}, polyak.WeightsError, "2 weights but 3"),
        ([{"a": 1.0}] * 2, {"schedule": [1.0, np.nan]}, polyak.ScheduleError, "not finite"),
        (
            [{"a": 1.0}] * 2,
            {"schedule": lambda n: [np.inf] * n},
            polyak.WeightsError,
            "not finite",
        ),
        ([{"a": 1.0}] * 2, {"schedule": [1.0, -3.0]}, polyak.WeightsError, "sum to -2.0"),
        ([{"a": 1.0}] * 2, {"schedule": "tail"}, polyak.ScheduleError, "tail"),
    ],
)
def test_bad_input_errors(params_list, kwargs, error, match):
    with pytest.raises(error, match=match):
        polyak.average(params_list, **kwargs)


def test_keras_style_weight_lists():
    rng = np.random.default_rng(3)
    lists = [
        [
            rng.normal(size=(2, 25)).astype(np.float32),
            rng.normal(size=25).astype(np.float32),
            rng.normal(size=(25, 3)).astype(np.float32),
            rng.normal(size=3).astype(np.float32),
        ]
        for _ in range(10)
    ]
    got = polyak.average(lists, "exponential")
    w = polyak.weights("exponential", 10)
    for g, column in zip(got, zip(*lists)):
        np.testing.assert_allclose(
            g, np.average(np.array(column), axis=0, weights=w), rtol=1e-5, atol=1e-6
        )


def test_torch_state_dicts():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    sds = []
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))
        sds.append({k: v.clone() for k, v in model.state_dict().items()})
    sds = [collections.OrderedDict(sd) for sd in sds]
    got = polyak.average(sds, "linear")
    assert isinstance(got, collections.OrderedDict) and list(got) == list(sds[0])
    w = polyak.weights("linear", 4)
    for key, value in got.items():
        assert isinstance(value, torch.Tensor) and value.dtype == sds[0][key].dtype
        if value.dtype.is_floating_point:
            ref = sum(wi * sd[key].double() for wi, sd in zip(w, sds))
            torch.testing.assert_close(value.double(), ref, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(value, sds[-1][key])  # num_batches_tracked: the newest
    model.load_state_dict(got)
    bf = [{"w": torch.randn(1000, dtype=torch.bfloat16)} for _ in range(5)]
    avg = polyak.average(bf)["w"]
    ref = torch.stack([b["w"].double() for b in bf]).mean(0).to(torch.bfloat16)
    assert avg.dtype == torch.bfloat16 and (avg == ref).float().mean() > 0.99
    params = [torch.nn.Parameter(torch.ones(3) * i) for i in range(3)]
    assert torch.equal(polyak.average([[p] for p in params])[0], torch.ones(3))


def test_jax_params():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(4)
    trees = [
        {
            "dense": {
                "kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=2), jnp.bfloat16),
            },
            "step": jnp.asarray(i),
        }
        for i in range(5)
    ]
    got = polyak.average(trees, S.ema(0.8))
    w = polyak.weights(S.ema(0.8), 5)
    k = np.average(
        np.stack([np.asarray(t["dense"]["kernel"], np.float64) for t in trees]), axis=0, weights=w
    )
    assert got["dense"]["kernel"].dtype == jnp.float32 and type(
        got["dense"]["kernel"]
    ).__module__.startswith("jax")
    np.testing.assert_allclose(np.asarray(got["dense"]["kernel"]), k, rtol=1e-6, atol=1e-6)
    assert got["dense"]["bias"].dtype == jnp.bfloat16
    assert int(got["step"]) == 4


def test_mixed_array_libraries_rejected():
    torch = pytest.importorskip("torch")
    with pytest.raises(polyak.DtypeError, match=r"snapshots\[0\]\['a'\].*same array library"):
        polyak.average([{"a": np.zeros(2, np.float32)}, {"a": torch.zeros(2)}])


def test_dtype_preserved_for_every_float_dtype():
    for dtype in FLOAT_DTYPES:
        got = polyak.average([np.ones(3, dtype), np.zeros(3, dtype)])
        assert got.dtype == dtype and np.all(got.astype(np.float64) == 0.5)
    random.seed(0)


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float16), np.dtype(np.float32)])
@pytest.mark.parametrize("w", [1.0, 0.3])
def test_kernel_accumulate_allocates_nothing(dtype, w):
    import tracemalloc

    from polyak import _kernel

    x = np.random.default_rng(5).normal(size=_kernel.CHUNK_ELEMENTS).astype(dtype)
    acc = np.empty(x.size, np.float32)
    scratch = np.empty_like(acc)
    _kernel.accumulate(acc, x, w, scratch, first=True)  # warm up numpy's own caches
    tracemalloc.start()
    try:
        _kernel.accumulate(acc, x, w, scratch, first=True)
        _kernel.accumulate(acc, x, w, scratch, first=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024, peak
    np.testing.assert_array_equal(acc, 2 * (x.astype(np.float32) * np.float32(w)))


def test_params_list_is_a_deprecated_alias_of_snapshots():
    snaps = [{"w": np.array([0.0, 2.0])}, {"w": np.array([2.0, 4.0])}]
    with pytest.warns(DeprecationWarning, match=r"params_list= is deprecated.*snapshots=") as rec:
        got = polyak.average(params_list=snaps, schedule="linear")
    assert rec[0].filename == __file__  # the caller's line, where Python shows it
    want = polyak.average(snapshots=snaps, schedule="linear")["w"]
    np.testing.assert_array_equal(got["w"], want)
    with pytest.raises(polyak.PolyakError, match="both params_list= and snapshots="):
        polyak.average(params_list=snaps, snapshots=snaps)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_array_api_int_average_clips_like_numpy(library):
    # Drift fix: the array-API int path rounded but did not clip, so 100 + 100 wrapped
    # around in int8 (or saturated differently per library) where numpy clips to 127.
    if library == "torch":
        torch = pytest.importorskip("torch")
        make = lambda v: torch.tensor(v, dtype=torch.int8)  # noqa: E731
    else:
        jnp = pytest.importorskip("jax.numpy")
        make = lambda v: jnp.asarray(v, dtype=jnp.int8)  # noqa: E731
    values = [[100, -100, 3, 120], [-100, 100, 4, 120]]
    for w in ([1.0, 1.0], [-2.0, 1.0]):
        ref = polyak.average(
            [np.array(v, np.int8) for v in values], w, normalize=False, int_policy="average"
        )
        got = polyak.average([make(v) for v in values], w, normalize=False, int_policy="average")
        assert type(got).__module__.split(".")[0] in ("torch", "jax", "jaxlib")
        assert str(got.dtype).endswith("int8")
        np.testing.assert_array_equal(np.asarray(got), ref)
    np.testing.assert_array_equal(ref, [-128, 127, -2, -120])  # -300, 300 clipped


def test_accumulate_dtype_is_validated_and_used_for_torch_leaves():
    # Drift fix: torch/JAX leaves ignored any accumulate_dtype but "float64", silently.
    torch = pytest.importorskip("torch")
    x = [torch.tensor([1.0 + 2**-23]), torch.tensor([1.0]), torch.tensor([1.0])]
    w = [1e-8, 1.0, -1.0]
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        polyak.average(x, w, normalize=False, accumulate_dtype="int32")
    with pytest.raises(polyak.DtypeError, match="accumulate_dtype"):
        polyak.average([{"i": np.arange(2)}] * 2, accumulate_dtype="bogus")
    hi = polyak.average(x, w, normalize=False, accumulate_dtype=np.float64)[0]
    assert hi.dtype == torch.float32 and float(hi) == float(np.float32(1e-8 * (1.0 + 2**-23)))
    # complex128 accumulates float32 leaves in complex128 with numpy: torch follows the rule
    c = [torch.tensor([1 + 1j], dtype=torch.complex64)] * 2
    got = polyak.average(c, accumulate_dtype="float64")
    assert got.dtype == torch.complex64 and complex(got[0]) == 1 + 1j
