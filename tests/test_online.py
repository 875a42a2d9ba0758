"""polyak.Averager: online == offline, in place, resumable, with clear errors.

References are independent of the averager: a float64 weighted sum with the schedule's
offline weights (``schedule.weights(n)``), and ``polyak.average``.
"""

from __future__ import annotations

import math
import tracemalloc
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import online_schedules, tree_lists

import polyak
from polyak import online as _online
from polyak import schedules as S
from polyak._errors import (
    DtypeError,
    EmptyInputError,
    NoOnlineFormError,
    PolyakError,
    ShapeError,
    StructureError,
)
from polyak._tree import flatten

# One of each factory, and several parameters for those that have them.
ONLINE_SCHEDULES = [
    S.equal(),
    S.linear(),
    S.exponential(),
    S.exponential(alpha=1.1),
    S.ema(0.5),
    S.ema(0.99),
    S.swa(0),
    S.swa(3),
    S.polynomial(0.0),
    S.polynomial(3.0),
    S.power(0.0),
    S.power(6.94),
    S.power(sigma_rel=0.1),
    S.ema_warmup(),
    S.ema_warmup(decay=0.9, power=1.0, min_decay=0.1),
    S.explicit([0, 0, 1, 2, 3, 1, 1, 1, 1, 1, 1, 5]),  # online up to its 12 weights
]

# Half-ulp of the output dtype (the one rounding of the average) plus room for the float32
# or float64 accumulation of up to 40 terms.
UNIT = {
    "float64": 2.0**-52,
    "float32": 2.0**-23,
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
}


def _reference(snapshots: list[np.ndarray], schedule: S.Schedule) -> np.ndarray:
    """The weighted average in float64 from the schedule's offline weights."""
    if schedule.name == "swa" and len(snapshots) <= schedule.params["start"]:
        # before its start, SWA tracks the newest snapshot (torch's SWA model does too)
        return np.asarray(snapshots[-1], dtype=np.float64)
    w = schedule.weights(len(snapshots))
    return sum(float(wi) * np.asarray(x, dtype=np.float64) for wi, x in zip(w, snapshots))


def _close(got: np.ndarray, ref: np.ndarray, snapshots: list[np.ndarray], dtype: str) -> None:
    scale = max(
        1.0, *(float(np.max(np.abs(np.asarray(x, np.float64)), initial=0)) for x in snapshots)
    )
    out_unit = UNIT[dtype]
    acc_unit = 2.0**-52 if dtype == "float64" else 2.0**-23
    tol = out_unit * np.abs(ref) + 8 * len(snapshots) * acc_unit * scale
    err = np.abs(np.asarray(got, dtype=np.float64) - ref)
    assert np.all(err <= tol), f"max error {err.max()} > tolerance, dtype {dtype}"


def test_every_online_factory_is_covered():
    # Non-vacuity: the fixed list holds every online factory, and every one is online.
    names = {s.name for s in ONLINE_SCHEDULES}
    online = {"equal", "linear", "exponential", "ema", "swa", "polynomial", "power"}
    assert online | {"ema_warmup", "explicit"} <= names
    assert all(s.online for s in ONLINE_SCHEDULES)
    assert not S.tail(2).online


def _dtype_name(dtype) -> str:
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else np.dtype(dtype).name


@given(data=st.data(), schedule=online_schedules())
def test_online_equals_offline_numpy(data, schedule):
    trees = data.draw(tree_lists(max_n=12))
    if len(trees) > 1 and data.draw(st.booleans()):
        # a long run, as in training: the same few snapshots again and again
        trees = [trees[i % len(trees)] for i in range(data.draw(st.integers(13, 40)))]
    if data.draw(st.integers(0, 9)) == 0:  # explicit weights are online too, up to their count
        n = len(trees)
        schedule = S.explicit(data.draw(st.lists(st.floats(0.01, 10.0), min_size=n, max_size=n)))
    avg = polyak.Averager(schedule)
    for tree in trees:
        avg.update(tree)
    assert avg.count == len(trees)
    got_leaves, _, got_spec = flatten(avg.value)
    ref_leaves, _, ref_spec = flatten(trees[0])
    assert got_spec == ref_spec
    for i, (got, first) in enumerate(zip(got_leaves, ref_leaves)):
        column = [flatten(t)[0][i] for t in trees]
        assert got.dtype == first.dtype and got.shape == first.shape
        _close(got, _reference(column, schedule), column, _dtype_name(first.dtype))


@pytest.mark.parametrize("schedule", ONLINE_SCHEDULES, ids=repr)
def test_matches_polyak_average(schedule):
    rng = np.random.default_rng(1)
    snaps = [
        {
            "dense": {
                "kernel": rng.normal(size=(6, 4)).astype(np.float32),
                "bias": rng.normal(size=4),
            },
            "emb": rng.normal(size=(5, 3)).astype(ml_dtypes.bfloat16),
            "mask": rng.integers(0, 2, size=3).astype(bool),
        }
        for _ in range(12)
    ]
    avg = polyak.Averager(schedule, int_policy="average")
    for snap in snaps:
        avg.update(snap)
    ref = polyak.average(snaps, schedule, int_policy="average")
    got = avg.value
    np.testing.assert_allclose(got["dense"]["bias"], ref["dense"]["bias"], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(
        got["dense"]["kernel"], ref["dense"]["kernel"], rtol=2e-6, atol=2e-6
    )
    emb_got, emb_ref = got["emb"].astype(np.float32), ref["emb"].astype(np.float32)
    # one bf16 rounding each, of accumulators that agree to float32 precision
    np.testing.assert_allclose(emb_got, emb_ref, rtol=2**-7, atol=1e-6)
    assert got["emb"].dtype == ref["emb"].dtype
    # bools averaged in float64 and rounded: equal wherever the mean is not a near tie at 0.5
    mean = schedule.weights(12) @ np.array([s["mask"] for s in snaps], dtype=np.float64)
    clear = np.abs(mean - 0.5) > 1e-9
    np.testing.assert_array_equal(got["mask"][clear], ref["mask"][clear])
    np.testing.assert_array_equal(got["mask"][clear], mean[clear] > 0.5)


# ---- torch and JAX leaves --------------------------------------------------------------------


@given(
    schedule=online_schedules(),
    n=st.integers(1, 30),
    dtype=st.sampled_from(["float64", "float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_online_equals_offline_torch(schedule, n, dtype, seed):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, dtype)
    snaps = [
        {"w": torch.randn(4, 7, generator=gen).to(tdtype), "n": torch.tensor(i)} for i in range(n)
    ]
    avg = polyak.Averager(schedule)
    for snap in snaps:
        avg.update(snap)
    got = avg.value
    assert isinstance(got["w"], torch.Tensor) and got["w"].dtype == tdtype
    assert int(got["n"]) == n - 1
    as64 = [s["w"].to(torch.float64).numpy() for s in snaps]
    _close(got["w"].to(torch.float64).numpy(), _reference(as64, schedule), as64, dtype)


@given(
    schedule=online_schedules(),
    n=st.integers(1, 20),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_online_equals_offline_jax(schedule, n, dtype, seed):
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(seed)
    snaps = [
        {"w": jnp.asarray(rng.normal(size=(3, 5)), dtype=getattr(jnp, dtype))} for _ in range(n)
    ]
    avg = polyak.Averager(schedule)
    for snap in snaps:
        avg.update(snap)
    got = avg.value["w"]
    assert type(got) is type(snaps[0]["w"]) and got.dtype == snaps[0]["w"].dtype
    as64 = [np.asarray(s["w"], dtype=np.float64) for s in snaps]
    _close(np.asarray(got, dtype=np.float64), _reference(as64, schedule), as64, dtype)


def test_jax_int_average_without_x64_warns_nothing():
    # Without jax_enable_x64 a float64 request is truncated to float32 with a UserWarning at
    # every update; the accumulator is float32 from the start instead, as in polyak.average.
    jax = pytest.importorskip("jax")
    if jax.config.jax_enable_x64:
        pytest.skip("JAX runs with x64 enabled")
    jnp = jax.numpy
    avg = polyak.Averager("equal", int_policy="average")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in (1, 2, 4):
            avg.update({"n": jnp.asarray([i, 10 * i], dtype=jnp.int32)})
        got = avg.value["n"]
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), [2, 23])


def test_torch_requires_grad_params_in_place():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    avg = polyak.Averager("equal")
    history = []
    for step in range(6):
        loss = model(torch.randn(16, 5)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        params = dict(model.named_parameters())
        assert all(p.requires_grad for p in params.values())
        avg.update(params)
        history.append({k: v.detach().clone() for k, v in params.items()})
        if step == 1:
            buffers = {k: v.data_ptr() for k, v in avg._state.average.items()}
    # updated in place: the accumulators are the same tensors as after the second update
    assert buffers == {k: v.data_ptr() for k, v in avg._state.average.items()}
    value = avg.value
    for k, v in value.items():
        assert not v.requires_grad
        expected = torch.stack([h[k] for h in history]).mean(0)
        torch.testing.assert_close(v, expected)
    model.load_state_dict({k: v for k, v in value.items()}, strict=False)


def test_torch_state_dict_then_named_parameters_match_by_path():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    avg = polyak.Averager("equal")
    avg.update(model.state_dict())  # an OrderedDict
    avg.update(dict(reversed(list(model.named_parameters()))))  # a dict, another order
    torch.testing.assert_close(avg.value["weight"], model.weight.detach())


def test_torch_frozen_parameters_are_averaged():
    # A frozen nn.Parameter (requires_grad=False, as in fine-tuning) is not detached, so it
    # reaches the averager as a Parameter while its average is a plain tensor.
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    avg = polyak.Averager("equal")
    seen = []
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias.add_(2.0)
        avg.update(dict(model.named_parameters()))
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for k, v in avg.value.items():
        torch.testing.assert_close(v, torch.stack([s[k] for s in seen]).mean(0))


def test_torch_float8_fold_on_accelerators():
    # Accelerators (acc not on the CPU) take TorchBackend.foreach_fold_device_cast; its code
    # is device agnostic, so CPU tensors check it here. torch refuses to promote float8, which
    # used to make every float8 update on a GPU fail.
    torch = pytest.importorskip("torch")
    from polyak import _backend

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16):
        x = torch.tensor([0.5, -1.0, 2.0, 0.25]).to(dtype)
        acc = torch.tensor([1.0, 1.0, -3.0, 0.0])
        expected = 0.75 * acc.double() + 0.25 * x.double()
        _backend.get(acc).foreach_fold_device_cast([acc], [x], 0.75)
        assert acc.dtype == torch.float32
        torch.testing.assert_close(acc.double(), expected)
    # int leaves averaged with int_policy="average" (a float64 accumulator)
    acc = torch.zeros(3, dtype=torch.float64)
    _backend.get(acc).foreach_fold_device_cast([acc], [torch.tensor([1, 2, 3])], 0.5)
    torch.testing.assert_close(acc, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))


def test_torch_float8_leaves_average_on_cpu():
    torch = pytest.importorskip("torch")
    snaps = [torch.tensor([0.5 * i, -float(i)]).to(torch.float8_e4m3fn) for i in range(1, 5)]
    avg = polyak.Averager("linear")
    for x in snaps:
        avg.update([x])
    got = avg.value[0]
    assert got.dtype == torch.float8_e4m3fn
    as64 = [s.double().numpy() for s in snaps]
    expected = torch.from_numpy(_reference(as64, S.linear())).to(torch.float8_e4m3fn)
    assert torch.equal(got.float(), expected.float())


def test_half_precision_accumulates_in_float32():
    # 2000 snapshots of 1.0 after one 0.0: the equal average is 2000/2001 ~ 0.9995, whose
    # increments (1/t)*(1 - avg) quickly drop below half a bf16 ulp. Folding in bf16 stalls
    # far below; a float32 accumulator gets within one bf16 rounding.
    avg = polyak.Averager("equal")
    avg.update([np.zeros(4, ml_dtypes.bfloat16)])
    ones = [np.ones(4, ml_dtypes.bfloat16)]
    naive = np.zeros(4, ml_dtypes.bfloat16)
    for t in range(2, 2002):
        avg.update(ones)
        d = S.equal().decay(t)
        naive = (d * naive.astype(np.float32) + (1 - d) * 1.0).astype(ml_dtypes.bfloat16)
    exact = 2000 / 2001
    got = avg.value[0].astype(np.float64)
    assert avg.value[0].dtype == ml_dtypes.bfloat16
    assert np.all(np.abs(got - exact) <= 2.0**-8)
    assert np.all(np.abs(naive.astype(np.float64) - exact) > 2.0**-6)  # the trap is real


# ---- allocations -------------------------------------------------------------------------------


def test_numpy_update_allocates_nothing_after_the_first():
    rng = np.random.default_rng(0)
    tree = {
        "a": rng.normal(size=(512, 512)).astype(np.float32),  # 1 MiB
        "b": rng.normal(size=200_000),  # 1.6 MB float64
        "c": rng.normal(size=300_000).astype(np.float16),  # accumulated in float32
        "d": rng.normal(size=150_000).astype(ml_dtypes.bfloat16),
        "step": np.arange(7),
    }
    smallest = min(x.nbytes for k, x in tree.items() if k != "step")
    avg = polyak.Averager(S.ema(0.9))
    avg.update(tree)
    avg.update(tree)  # the second update creates the scratch buffers
    numpy_domain = [tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(numpy_domain)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            avg.update(tree)
        _, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot().filter_traces(numpy_domain)
    finally:
        tracemalloc.stop()
    # No array data was allocated (numpy reports its buffers in its own tracemalloc domain)...
    grown = sum(s.size_diff for s in after.compare_to(before, "lineno"))
    assert grown == 0
    # ...and at no moment did anything close to a leaf-sized buffer exist: the peak above the
    # baseline is a few Python objects (chunk views, flattening), not data.
    assert peak - base < 32 * 1024 < smallest // 8
    assert avg.count == 7


def test_torch_update_allocates_nothing_after_the_first():
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    params = {
        "f32": torch.randn(256, 1024, requires_grad=True),
        "bf16": torch.randn(300_000).to(torch.bfloat16),  # averaged in a float32 buffer
        "f64": torch.randn(50_000, dtype=torch.float64),
        "count": torch.tensor(3),
    }
    avg = polyak.Averager(S.ema(0.9), int_policy="average")  # the int leaf folds in float64
    avg.update(params)
    avg.update(params)  # the second update creates the scratch buffer
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(3):
            avg.update(params)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events())
    assert allocated == 0, [
        (e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0
    ]
    # the profiler does see allocations (non-vacuity)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        params["bf16"].to(torch.float32)
    assert sum(max(e.cpu_memory_usage, 0) for e in prof.events()) >= 4 * 300_000


# ---- resuming ----------------------------------------------------------------------------------


def _numpy_run(n):
    rng = np.random.default_rng(42)
    return [
        {
            "w": rng.normal(size=(33, 17)).astype(ml_dtypes.bfloat16),
            "b": rng.normal(size=17).astype(np.float32),
            "v": rng.normal(size=5),
            "count": np.int32(i),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("schedule", [S.ema_warmup(0.99), S.linear(), S.power(sigma_rel=0.15)])
@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_numpy_is_bit_for_bit(schedule, via, tmp_path):
    snaps = _numpy_run(20)
    straight = polyak.Averager(schedule, int_policy="average")
    for snap in snaps:
        straight.update(snap)

    first = polyak.Averager(schedule, int_policy="average")
    for snap in snaps[:9]:
        first.update(snap)
    if via == "state_dict":
        saved = first.state_dict()
        for snap in snaps[9:12]:
            first.update(snap)  # later updates must not leak into the saved state
        resumed = polyak.Averager(schedule, int_policy="average")
        resumed.load_state_dict(saved)
    else:
        first.save(tmp_path / "avg.safetensors")
        del first
        resumed = polyak.Averager.load(tmp_path / "avg.safetensors")
        assert resumed.schedule.weights(20).tolist() == schedule.weights(20).tolist()
    assert resumed.count == 9
    for snap in snaps[9:]:
        resumed.update(snap)
    a, b = straight.value, resumed.value
    for key in a:
        assert a[key].dtype == b[key].dtype
        assert a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_torch_is_bit_for_bit(via, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    snaps = [
        {
            "layer.weight": torch.randn(8, 4, dtype=torch.bfloat16, requires_grad=True),
            "layer.bias": torch.randn(8),
            "bn.num_batches_tracked": torch.tensor(i),
        }
        for i in range(15)
    ]
    schedule = S.ema(0.9)
    straight = polyak.Averager(schedule)
    for snap in snaps:
        straight.update(snap)
    first = polyak.Averager(schedule)
    for snap in snaps[:6]:
        first.update(snap)
    if via == "state_dict":
        resumed = polyak.Averager(schedule)
        resumed.load_state_dict(first.state_dict())
    else:
        first.save(tmp_path / "avg.safetensors")
        resumed = polyak.Averager.load(tmp_path / "avg.safetensors", like=snaps[0])
        # before any update, the average is readable as numpy, keyed by name
        assert set(resumed.value) == set(snaps[0])
    for snap in snaps[6:]:
        resumed.update(snap)
    a, b = straight.value, resumed.value
    for key in a:
        assert isinstance(b[key], torch.Tensor) and b[key].dtype == a[key].dtype
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_resume_jax_is_bit_for_bit(via, tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(3)
    snaps = [
        {
            "w": jnp.asarray(rng.normal(size=(6, 5)), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=5)),
        }
        for _ in range(12)
    ]
    schedule = S.power(sigma_rel=0.1)
    straight = polyak.Averager(schedule)
    for snap in snaps:
        straight.update(snap)
    first = polyak.Averager(schedule)
    for snap in snaps[:5]:
        first.update(snap)
    if via == "state_dict":
        resumed = polyak.Averager(schedule)
        resumed.load_state_dict(first.state_dict())
    else:
        first.save(tmp_path / "avg.safetensors")
        resumed = polyak.Averager.load(tmp_path / "avg.safetensors", like=snaps[0])
    for snap in snaps[5:]:
        resumed.update(snap)
    a, b = straight.value, resumed.value
    for key in a:
        assert type(b[key]) is type(snaps[0][key]) and b[key].dtype == a[key].dtype
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


def test_save_is_readable_by_the_official_reader(tmp_path):
    from safetensors.numpy import load_file

    avg = polyak.Averager(S.ema(0.5))
    avg.update({"w": np.full(3, 2.0, ml_dtypes.bfloat16)})
    avg.update({"w": np.full(3, 4.0, ml_dtypes.bfloat16)})
    avg.save(tmp_path / "a.safetensors")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    # the accumulator is stored in float32, so resuming loses nothing
    assert tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(tensors["w"], np.full(3, 3.0, np.float32))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("polyak.dtypes", "5", "polyak.dtypes must map tensor names"),
        ("polyak.dtypes", '["float64"]', "polyak.dtypes must map tensor names"),
        ("polyak.int_policy", "median", "int_policy"),
        ("polyak.schedule", '{"name": "ema", "params": {"decay": 2.0}}', "decay"),
        ("polyak.count", "two", "polyak.count|two"),
    ],
)
def test_load_names_the_file_for_malformed_metadata(tmp_path, key, value, message):
    from polyak.safetensors import read_metadata

    avg = polyak.Averager(S.ema(0.9))
    avg.update({"w": np.ones(2)})
    good = tmp_path / "good.safetensors"
    avg.save(good)
    meta = dict(read_metadata(good))
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    polyak.safetensors.save({"w": np.ones(2)}, bad, meta)
    with pytest.raises(PolyakError, match=message) as info:
        polyak.Averager.load(bad)
    assert "bad.safetensors" in str(info.value)


def test_load_rejects_other_files_and_other_schedules(tmp_path):
    polyak.safetensors.save({"w": np.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(PolyakError, match="not an Averager state"):
        polyak.Averager.load(tmp_path / "plain.safetensors")
    avg = polyak.Averager(S.ema(0.9))
    avg.update({"w": np.ones(2)})
    other = polyak.Averager(S.ema(0.5))
    with pytest.raises(PolyakError, match="schedule"):
        other.load_state_dict(avg.state_dict())
    with pytest.raises(PolyakError, match="int_policy"):
        polyak.Averager(S.ema(0.9), int_policy="first").load_state_dict(avg.state_dict())
    with pytest.raises(PolyakError, match="missing the keys"):
        other.load_state_dict({"count": 1})


def test_loaded_average_must_match_the_params(tmp_path):
    avg = polyak.Averager()
    avg.update({"a": np.ones(2), "b": np.ones(3)})
    avg.save(tmp_path / "a.safetensors")
    path = tmp_path / "a.safetensors"
    with pytest.raises(StructureError, match=r"missing \['b'\].*unexpected \['c'\]"):
        polyak.Averager.load(path, like={"a": np.ones(2), "c": np.ones(3)})
    with pytest.raises(ShapeError, match=r"like\['b'\]: shape \(4,\)"):
        polyak.Averager.load(path, like={"a": np.ones(2), "b": np.ones(4)})


# ---- refusals and bad input --------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [S.tail(3), S.tail(fraction=0.5), S.get("tail", k=2)])
def test_schedules_without_online_form_are_refused(schedule):
    with pytest.raises(NoOnlineFormError, match="SnapshotDir") as info:
        polyak.Averager(schedule)
    assert isinstance(info.value, PolyakError)


def test_custom_schedule_is_refused_too():
    with pytest.raises(NoOnlineFormError, match="SnapshotDir"):
        polyak.Averager(lambda n: np.ones(n))


def test_structure_mismatch_lists_every_path():
    avg = polyak.Averager()
    avg.update({"enc": {"w": np.ones(2), "b": np.ones(2)}, "head": np.ones(1)})
    with pytest.raises(StructureError) as info:
        avg.update({"enc": {"w": np.ones(2)}, "head": np.ones(1), "extra": np.ones(1), "z": 1.0})
    msg = str(info.value)
    assert "missing 1 leaves: params['enc']['b']" in msg
    assert "unexpected 2 leaves: params['extra'], params['z']" in msg
    assert avg.count == 1  # a refused update changes nothing


def test_shape_mismatch_names_the_leaf_and_changes_nothing():
    avg = polyak.Averager()
    avg.update({"enc": [np.zeros((2, 3)), np.zeros(4)]})
    before = avg.value
    with pytest.raises(ShapeError, match=r"params\['enc'\]\[1\]: shape \(5,\) != \(4,\)"):
        avg.update({"enc": [np.ones((2, 3)), np.ones(5)]})
    after = avg.value
    assert avg.count == 1
    np.testing.assert_array_equal(after["enc"][0], before["enc"][0])


def test_shape_mismatch_in_reordered_containers_names_the_right_leaf():
    from collections import OrderedDict

    avg = polyak.Averager()
    avg.update(OrderedDict([("b", np.zeros(2)), ("a", np.zeros(3))]))
    with pytest.raises(ShapeError, match=r"params\['b'\]: shape \(5,\) != \(2,\)"):
        avg.update({"a": np.zeros(3), "b": np.zeros(5)})
    with pytest.raises(ShapeError, match=r"params\['a'\]: shape \(4,\) != \(3,\)"):
        avg.update(OrderedDict([("b", np.zeros(2)), ("a", np.zeros(4))]))
    assert avg.count == 1


def test_dtype_kind_and_library_changes_are_errors():
    torch = pytest.importorskip("torch")
    avg = polyak.Averager()
    avg.update({"w": np.zeros(3), "n": np.int64(1)})
    with pytest.raises(DtypeError, match=r"params\['n'\]: dtype float64 \(float\)"):
        avg.update({"w": np.zeros(3), "n": np.float64(1)})
    with pytest.raises(DtypeError, match=r"params\['w'\]: a torch.Tensor"):
        avg.update({"w": torch.zeros(3), "n": np.int64(1)})
    with pytest.raises(DtypeError, match="cannot be averaged"):
        polyak.Averager().update({"s": np.array(["a"])})


def _to_library(library):
    if library == "numpy":
        return np.asarray
    if library == "torch":
        torch = pytest.importorskip("torch")
        return torch.as_tensor
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray


@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_int_policies(library):
    to = _to_library(library)
    snaps = [
        {"n": to(np.array([i, 2 * i, 7], np.int32)), "flag": to(np.array(i % 2 == 0))}
        for i in range(1, 6)
    ]
    for policy in ("last", "first", "average"):
        avg = polyak.Averager("linear", int_policy=policy)
        for snap in snaps:
            avg.update(snap)
        ref = polyak.average(snaps, "linear", int_policy=policy)
        got = avg.value
        assert type(got["n"]) is type(snaps[0]["n"]) and got["n"].dtype == snaps[0]["n"].dtype
        np.testing.assert_array_equal(np.asarray(got["n"]), np.asarray(ref["n"]))
        np.testing.assert_array_equal(np.asarray(got["flag"]), np.asarray(ref["flag"]))
    # linear weights 1..5 / 15: sum_i w_i * i = 55/15 = 3.67 -> 4; 2i -> 7.33 -> 7
    np.testing.assert_array_equal(np.asarray(got["n"]), [4, 7, 7])
    with pytest.raises(
        DtypeError, match=r"params\['flag'\]: (torch\.)?bool leaf.*int_policy='error'"
    ):
        polyak.Averager(int_policy="error").update(snaps[0])
    with pytest.raises(PolyakError, match="int_policy"):
        polyak.Averager(int_policy="mean")


def test_value_is_a_copy_and_needs_an_update():
    avg = polyak.Averager()
    with pytest.raises(EmptyInputError):
        avg.value  # noqa: B018
    with pytest.raises(EmptyInputError):
        avg.save("unused.safetensors")
    x = np.arange(4.0)
    avg.update({"x": x})
    v = avg.value
    avg.update({"x": x + 4})
    np.testing.assert_array_equal(v["x"], np.arange(4.0))  # unchanged by the later update
    np.testing.assert_array_equal(x, np.arange(4.0))  # the snapshot is never modified
    np.testing.assert_array_equal(avg.value["x"], np.arange(4.0) + 2)


def test_pure_functions_match_the_wrapper():
    snaps = _numpy_run(6)
    schedule = S.ema(0.8)
    state, workspace = _online.init(), {}
    wrapper = polyak.Averager(schedule)
    for snap in snaps:
        state = _online.update(state, snap, schedule, workspace=workspace)
        wrapper.update(snap)
    assert state.count == 6
    pure, wrapped = _online.value(state), wrapper.value
    assert all(pure[k].tobytes() == wrapped[k].tobytes() for k in pure)
    with pytest.raises(NoOnlineFormError):
        _online.update(state, snaps[0], S.tail(2))


def test_ema_closed_form():
    # torch's test_swa_utils style: the EMA as an explicit weighted sum
    d, xs = 0.7, [np.array([float(v)]) for v in (3.0, -1.0, 4.0, 1.5)]
    avg = polyak.Averager(S.ema(d))
    for x in xs:
        avg.update(x)
    n = len(xs)
    expected = d ** (n - 1) * xs[0] + sum((1 - d) * d ** (n - 1 - i) * xs[i] for i in range(1, n))
    assert math.isclose(float(avg.value[0]), float(expected[0]), rel_tol=1e-15)


@pytest.mark.parametrize(
    "module", ["polyak._online", "polyak._snapshots", "polyak.online", "polyak._kernel"]
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_averager_accumulate_dtype_raises_the_precision():
    x = [np.array([1.0 + 2**-23], np.float32), np.array([1.0], np.float32)]
    plain, wide = (
        polyak.Averager(S.ema(1 - 1e-8)),
        polyak.Averager(S.ema(1 - 1e-8), accumulate_dtype="float64"),
    )
    for avg in (plain, wide):
        for snap in x:
            avg.update({"w": snap})
    assert wide.state.average["w"].dtype == np.float64
    assert plain.state.average["w"].dtype == np.float32
    ref = (1 - 1e-8) * (1.0 + 2**-23) + 1e-8 * 1.0  # float64
    assert wide.value["w"].dtype == np.float32
    assert wide.value["w"][0] == np.float32(ref)
    with pytest.raises(DtypeError, match="accumulate_dtype"):
        polyak.Averager(accumulate_dtype="int32")


def test_averager_accumulate_dtype_for_torch_leaves():
    torch = pytest.importorskip("torch")
    avg = polyak.Averager(S.linear(), accumulate_dtype="float64")
    for i in range(3):
        avg.update({"w": torch.full((2,), float(i), dtype=torch.bfloat16)})
    assert avg.state.average["w"].dtype == torch.float64
    assert avg.value["w"].dtype == torch.bfloat16
    # weights 1/6, 2/6, 3/6 of 0, 1, 2: 8/6, rounded once to bf16
    assert avg.value["w"].tolist() == [float(torch.tensor(8 / 6).to(torch.bfloat16))] * 2


def test_load_without_like_is_numpy_by_tensor_name(tmp_path):
    avg = polyak.Averager(S.ema(0.5), int_policy="average")
    avg.update({"enc": {"w": np.ones(2, np.float32)}, "n": np.int64(3)})
    avg.save(tmp_path / "a.safetensors")
    resumed = polyak.Averager.load(tmp_path / "a.safetensors")
    assert isinstance(resumed.state, polyak.online.OnlineState)
    assert set(resumed.state.average) == {"enc.w", "n"}
    resumed.update({"enc.w": np.full(2, 3.0, np.float32), "n": np.int64(6)})
    got = resumed.value
    np.testing.assert_array_equal(got["enc.w"], np.full(2, 2.0, np.float32))
    assert got["n"] == 4 and got["n"].dtype == np.int64  # 4.5 rounds half to even
    torch = pytest.importorskip("torch")
    with pytest.raises(DtypeError, match="torch.Tensor"):  # like= is how to resume in torch
        resumed.update({"enc.w": torch.ones(2), "n": torch.tensor(1)})
    on_torch = polyak.Averager.load(
        tmp_path / "a.safetensors", like={"enc": {"w": torch.ones(2)}, "n": torch.tensor(1)}
    )
    assert isinstance(on_torch.state.average["enc"]["w"], torch.Tensor)
    assert on_torch.value["n"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.int8])
@pytest.mark.parametrize("end", ["max", "min"])
def test_online_int_average_saturates_at_the_dtype_range_like_polyak_average(dtype, end):
    """Equal int leaves at the dtype's limit average to themselves: float64 holds INT64_MAX
    as 2**63, which a plain clip-then-cast wrapped to INT64_MIN on the numpy path."""
    value = getattr(np.iinfo(dtype), end)
    snaps = [{"n": np.array([value, 7], dtype)} for _ in range(3)]
    avg = polyak.Averager("equal", int_policy="average")
    for s in snaps:
        avg.update(s)
    want = polyak.average(snaps, int_policy="average")["n"]  # the kernel's exact int64 path
    np.testing.assert_array_equal(want, [value, 7])
    np.testing.assert_array_equal(avg.value["n"], want)
    assert avg.value["n"].dtype == dtype
