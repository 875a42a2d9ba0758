"""Streaming merge of safetensors checkpoints: equal to polyak.average, sharding, errors."""

from __future__ import annotations

import json
import os
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
import polyak.safetensors as pst
from polyak import schedules
from polyak.safetensors import OutputError

safetensors_numpy = pytest.importorskip("safetensors.numpy")

FLOATS = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16,
          ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]  # fmt: skip
INTS = [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.bool_]


def _sample(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return (rng.standard_normal(shape) * 2).astype(dtype)


def _write_run(folder, n, make, name="ckpt_{i}.safetensors", metadata=None):
    paths, trees = [], []
    for i in range(n):
        tree = make(i)
        path = os.path.join(folder, name.format(i=i))
        pst.save(tree, path, metadata)
        paths.append(path)
        trees.append(pst.load(path))  # what polyak.average sees: the data as stored
    return paths, trees


def _assert_bitwise(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for k, e in expected.items():
        e = np.asarray(e)
        assert got[k].dtype == e.dtype and got[k].shape == e.shape, k
        assert got[k].tobytes() == e.tobytes(), k


def _mixed(rng):
    def make(i):
        tree = {f"f.{np.dtype(d).name}": _sample(rng, d, (37, 53)) for d in FLOATS}
        tree.update({f"i.{np.dtype(d).name}": _sample(rng, d, (11,)) for d in INTS})
        tree["scalar"] = np.float32(rng.standard_normal())
        tree["empty"] = np.zeros((0, 3), np.float32)
        tree["step"] = np.int64(100 * (i + 1))
        return tree

    return make


SCHEDULES = [
    None,
    "linear",
    schedules.exponential(alpha=2.0),
    schedules.ema(0.7),
    schedules.tail(2),
    [0.5, 0.0, 2.0, 1.0, 0.25],
    schedules.power(sigma_rel=0.1),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s)[:30])
@pytest.mark.parametrize("threads", [1, 3])
def test_merge_equals_average_for_every_dtype(tmp_path, schedule, threads):
    paths, trees = _write_run(str(tmp_path), 5, _mixed(np.random.default_rng(0)))
    out = str(tmp_path / "merged.safetensors")
    # Tiny chunks and spans: many chunks per tensor, spread over threads.
    (report,) = pst.merge_many(
        paths, [out], [polyak.weights(schedule, 5)], normalize=False, threads=threads,
        chunk_elements=97, schedules=[None],
    )  # fmt: skip
    _assert_bitwise(pst.load(out), polyak.average(trees, schedule))
    report2 = pst.merge(paths, out, schedule, threads=threads)
    _assert_bitwise(pst.load(out), polyak.average(trees, schedule))
    assert report2.weights == tuple(polyak.weights(schedule, 5))
    assert report2.tensors == len(trees[0]) and report.tensors == report2.tensors


@pytest.mark.parametrize("policy", ["last", "first", "average"])
def test_int_policies_match_average(tmp_path, policy):
    paths, trees = _write_run(str(tmp_path), 4, _mixed(np.random.default_rng(1)))
    out = str(tmp_path / "m.safetensors")
    pst.merge(paths, out, "linear", int_policy=policy)
    _assert_bitwise(pst.load(out), polyak.average(trees, "linear", int_policy=policy))


def test_int_policy_error_fails_before_writing(tmp_path):
    paths, _ = _write_run(str(tmp_path), 2, lambda i: {"w": np.ones(3), "step": np.int64(i)})
    with pytest.raises(polyak.DtypeError, match="'step'.*int_policy='error'"):
        pst.merge(paths, str(tmp_path / "m.safetensors"), int_policy="error")
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0.safetensors", "ckpt_1.safetensors"]


def test_dtype_cast_and_accumulate_dtype(tmp_path):
    paths, trees = _write_run(str(tmp_path), 3, _mixed(np.random.default_rng(2)))
    out = str(tmp_path / "m.safetensors")
    pst.merge(paths, out, "linear", dtype="bf16")
    got = pst.load(out)

    def widen(tree):  # the accumulator's dtype: float32, or float64 for float64
        return {
            k: v.astype(np.float32)
            if polyak._kernel.dtype_kind(v.dtype) == "float" and v.dtype != np.float64
            else v
            for k, v in tree.items()
        }

    # The float32 (float64) sum is rounded once, straight to bf16: the same as casting the
    # average of the inputs taken in the accumulator's dtype.
    ref = polyak.average([widen(t) for t in trees], "linear")
    for k, e in ref.items():
        if polyak._kernel.dtype_kind(e.dtype) == "float":
            assert got[k].dtype == ml_dtypes.bfloat16, k
            assert got[k].tobytes() == e.astype(ml_dtypes.bfloat16).tobytes(), k
        else:
            assert got[k].dtype == e.dtype and got[k].tobytes() == e.tobytes(), k
    pst.merge(paths, out, "linear", accumulate_dtype="float64")
    _assert_bitwise(pst.load(out), polyak.average(trees, "linear", accumulate_dtype="float64"))
    pst.merge(paths, out, "linear", accumulate_dtype="fp64")  # the names --dtype takes
    _assert_bitwise(pst.load(out), polyak.average(trees, "linear", accumulate_dtype="float64"))
    with pytest.raises(polyak.DtypeError, match="int8"):
        pst.merge(paths, out, dtype="int8")


def test_metadata_kept_with_polyak_record(tmp_path):
    paths, _ = _write_run(
        str(tmp_path), 3, lambda i: {"w": np.full(4, float(i), np.float32)},
        metadata={"format": "pt", "note": "first"},
    )  # fmt: skip
    out = str(tmp_path / "m.safetensors")
    report = pst.merge(paths, out, schedules.ema(0.5))
    meta = safetensors_numpy.safe_open(out, "np").metadata()
    assert meta["format"] == "pt" and meta["note"] == "first"
    record = json.loads(meta["polyak"])
    assert record["schedule"] == {"name": "ema", "params": {"decay": 0.5}}
    assert record["weights"] == list(report.weights) == [0.25, 0.25, 0.5]
    rebuilt = schedules.from_spec(record["schedule"]["name"], record["schedule"]["params"])
    assert rebuilt == schedules.ema(0.5)
    assert str(out) in str(report) and report.bytes_written == os.path.getsize(out)
    assert report.bytes_read == 3 * 16


def test_merge_many_per_output_metadata(tmp_path):
    paths, _ = _write_run(
        str(tmp_path), 2, lambda i: {"w": np.full(4, float(i), np.float32)},
        metadata={"format": "pt", "step": "first"},
    )  # fmt: skip
    outs = [str(tmp_path / "own.safetensors"), str(tmp_path / "kept"), str(tmp_path / "d")]
    pst.merge_many(
        paths, outs, [[1, 1], [0, 1], [1, 0]],
        metadata=[{"format": "pt", "mine": "yes"}, None, {"format": "np", "x": "y"}],
    )  # fmt: skip
    read = [safetensors_numpy.safe_open(f, "np").metadata() for f in (
        outs[0], os.path.join(outs[1], "model.safetensors"),
        os.path.join(outs[2], "model.safetensors"),
    )]  # fmt: skip
    assert {k: v for k, v in read[0].items() if k != "polyak"} == {"format": "pt", "mine": "yes"}
    assert {k: v for k, v in read[1].items() if k != "polyak"} == {"format": "pt", "step": "first"}
    assert {k: v for k, v in read[2].items() if k != "polyak"} == {"format": "np", "x": "y"}
    assert [json.loads(m["polyak"])["weights"] for m in read] == [[0.5, 0.5], [0, 1], [1, 0]]
    with pytest.raises(polyak.PolyakError, match="one entry per output"):
        pst.merge_many(paths, outs[:2], [[1, 1], [1, 0]], metadata=[None])
    with pytest.raises(polyak.PolyakError, match="strings to strings"):
        pst.merge_many(paths, outs[:1], [[1, 1]], metadata=[{"step": 3}])


def test_merge_many_weights_take_schedules_or_vectors(tmp_path):
    paths, trees = _write_run(str(tmp_path), 4, _mixed(np.random.default_rng(3)))
    outs = [str(tmp_path / f"{k}.safetensors") for k in ("lin", "ema", "vec", "eq", "fn")]
    entries = ["linear", schedules.ema(0.5), [1.0, 0.0, 2.0, 1.0], None, lambda n: [1] * n]
    reports = pst.merge_many(paths, outs, entries, chunk_elements=97, threads=2)
    for out, entry, report in zip(outs, entries, reports, strict=True):
        # A schedule gives the weights polyak.average gives it, bit for bit.
        _assert_bitwise(pst.load(out), polyak.average(trees, entry))
        assert report.weights == tuple(polyak.weights(entry, 4))
    records = [json.loads(safetensors_numpy.safe_open(o, "np").metadata()["polyak"]) for o in outs]
    assert records[0]["schedule"] == {"name": "linear", "params": {}}
    assert records[1]["schedule"] == {"name": "ema", "params": {"decay": 0.5}}
    assert records[2]["schedule"] == {"name": "explicit"}  # a vector has no schedule of its own
    assert records[3]["schedule"] == {"name": "equal", "params": {}}
    names = [r.schedule for r in reports[:4]]
    assert names == ["linear()", "ema(decay=0.5)", "explicit", "equal()"]
    # schedules= still names the record, over the entry's own schedule.
    pst.merge_many(paths, outs[:1], ["linear"], schedules=[schedules.tail(4)])
    meta = safetensors_numpy.safe_open(outs[0], "np").metadata()
    assert json.loads(meta["polyak"])["schedule"]["name"] == "tail"
    # normalize=False applies to schedules as to vectors.
    pst.merge_many(paths, outs[:1], [schedules.explicit([0, 0, 2, 0])], normalize=False)
    _assert_bitwise(pst.load(outs[0]), polyak.average(trees, [0, 0, 2, 0], normalize=False))
    with pytest.raises(polyak.WeightsError, match="3 weights but 4 checkpoints"):
        pst.merge_many(paths, outs[:1], [schedules.explicit([1, 2, 3])])
    with pytest.raises(polyak.ScheduleError):
        pst.merge_many(paths, outs[:1], ["no such schedule"])
    with pytest.raises(polyak.WeightsError, match="weight vector 0 has 2 weights"):
        pst.plan_merge(paths, outs[:1], [[1, 2]])
    plan = pst.plan_merge(paths, outs[:2], ["linear", [0, 0, 0, 1]])
    assert plan.weights == (tuple(polyak.weights("linear", 4)), (0.0, 0.0, 0.0, 1.0))


def test_weight_vectors_is_a_deprecated_alias_of_weights(tmp_path):
    paths, trees = _write_run(str(tmp_path), 3, lambda i: {"w": np.full(5, i, np.float32)})
    out = str(tmp_path / "m.safetensors")
    with pytest.warns(DeprecationWarning, match="weight_vectors= is deprecated.*use weights="):
        (report,) = pst.merge_many(paths, [out], weight_vectors=[[1, 0, 1]])
    assert report.weights == (0.5, 0.0, 0.5)
    _assert_bitwise(pst.load(out), polyak.average(trees, [1, 0, 1]))
    with pytest.warns(DeprecationWarning, match="plan_merge"):
        plan = pst.plan_merge(paths, [out], weight_vectors=["linear"])
    assert plan.weights == (tuple(polyak.weights("linear", 3)),)
    with pytest.raises(polyak.PolyakError, match="both weight_vectors= and weights="):
        pst.merge_many(paths, [out], weights=[[1, 1, 1]], weight_vectors=[[1, 1, 1]])


def _sharded_run(folder, n, rng):
    """n sharded checkpoints written with the official library, HF layout."""
    paths, trees = [], []
    for i in range(n):
        d = os.path.join(folder, f"checkpoint-{(i + 1) * 500}")
        os.makedirs(d)
        parts = [
            {"embed.weight": _sample(rng, np.float32, (50, 16)), "step": np.array(i, np.int64)},
            {
                "layers.0.w": _sample(rng, ml_dtypes.bfloat16, (16, 16)),
                "layers.0.b": _sample(rng, np.float16, (16,)),
            },  # fmt: skip
        ]
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        wm = {}
        for part, name in zip(parts, names, strict=True):
            pst.save(part, os.path.join(d, name), {"format": "pt"})
            wm.update({k: name for k in part})
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0, "extra": "kept"}, "weight_map": wm}, f)
        paths.append(d)
        trees.append(pst.load(d))
    return paths, trees


def test_sharded_in_sharded_out_same_layout(tmp_path):
    paths, trees = _sharded_run(str(tmp_path), 3, np.random.default_rng(3))
    out = tmp_path / "merged"
    report = pst.merge(paths, str(out), "linear", threads=2)
    assert sorted(os.listdir(out)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    source = json.loads((tmp_path / "checkpoint-500" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source["weight_map"]
    assert index["metadata"]["extra"] == "kept"
    assert index["metadata"]["total_size"] == sum(
        np.asarray(v).nbytes for v in pst.load(str(out)).values()
    )
    _assert_bitwise(pst.load(str(out)), polyak.average(trees, "linear"))
    assert len(report.files) == 3
    # Each shard alone is a valid file for the official reader.
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        safetensors_numpy.load_file(str(out / shard))


def test_sharded_in_single_out_and_resharding(tmp_path):
    paths, trees = _sharded_run(str(tmp_path), 2, np.random.default_rng(4))
    single = str(tmp_path / "one.safetensors")
    pst.merge(paths, single)
    _assert_bitwise(pst.load(single), polyak.average(trees))
    resharded = tmp_path / "small"
    pst.merge(paths, str(resharded), max_shard_size="2KB")
    shards = [f for f in os.listdir(resharded) if f.endswith(".safetensors")]
    assert len(shards) >= 3
    for f in shards:  # 2KB is 2000 bytes; a tensor bigger than that gets its own shard
        tensors = safetensors_numpy.load_file(str(resharded / f))
        assert len(tensors) == 1 or sum(v.nbytes for v in tensors.values()) <= 2000
    _assert_bitwise(pst.load(str(resharded)), polyak.average(trees))
    # A single file merged into a directory becomes model.safetensors with an index.
    d = tmp_path / "from_single"
    pst.merge([single, single], str(d))
    assert sorted(os.listdir(d)) == ["model.safetensors", "model.safetensors.index.json"]


def test_merge_many_one_pass_equals_separate_merges(tmp_path):
    paths, trees = _write_run(str(tmp_path), 4, _mixed(np.random.default_rng(5)))
    vectors = [polyak.weights("linear", 4), polyak.weights(schedules.tail(1), 4), [1.0, -1, 2, 0]]
    outs = [str(tmp_path / f"o{k}.safetensors") for k in range(3)]
    reports = pst.merge_many(paths, outs, vectors, normalize=False, threads=2, chunk_elements=64)
    assert [r.output for r in reports] == outs
    assert len({r.bytes_read for r in reports}) == 1
    for out, w in zip(outs, vectors, strict=True):
        _assert_bitwise(pst.load(out), polyak.average(trees, list(w), normalize=False))
    # normalize=True divides each vector by its own sum, as polyak.weights does.
    pst.merge_many(paths, outs[:1], [[1, 1, 2, 0]])
    _assert_bitwise(pst.load(outs[0]), polyak.average(trees, [1, 1, 2, 0]))


def test_zero_weight_inputs_are_not_read(tmp_path):
    paths, trees = _write_run(str(tmp_path), 3, lambda i: {"w": np.full(1000, i, np.float32)})
    report = pst.merge(paths, str(tmp_path / "m.safetensors"), schedules.tail(1))
    assert report.bytes_read == 4000
    _assert_bitwise(pst.load(str(tmp_path / "m.safetensors")), trees[-1])


@pytest.mark.parametrize("policy, reads", [("last", 1), ("first", 1), ("average", 2)])
def test_int_tensors_read_only_the_inputs_the_policy_uses(tmp_path, policy, reads):
    def make(i):
        return {"w": np.full(10, i, np.float32), "ids": np.arange(1000, dtype=np.int64) * i}

    paths, trees = _write_run(str(tmp_path), 4, make)
    out = str(tmp_path / "m.safetensors")
    w = [0.0, 1.0, 3.0, 0.0]
    plan = pst.plan_merge(paths, [out], [w], int_policy=policy)
    report = pst.merge(paths, out, w, int_policy=policy, threads=2)
    assert report.bytes_read == plan.bytes_to_read == 2 * 40 + reads * 8000
    _assert_bitwise(pst.load(out), polyak.average(trees, w, int_policy=policy))
    # All-zero weights (normalize=False) average the ints to zeros, reading one input.
    report = pst.merge(paths, out, [0, 0, 0, 0], int_policy="average", normalize=False)
    assert report.bytes_read == 8000
    _assert_bitwise(
        pst.load(out), polyak.average(trees, [0, 0, 0, 0], int_policy="average", normalize=False)
    )


def test_mismatches_are_listed(tmp_path):
    a = {"a": np.ones(3, np.float32), "b": np.ones(2), "c": np.ones(1, np.float32)}
    b = {"a": np.ones(4, np.float32), "b": np.ones(2, np.float32), "d": np.ones(1)}
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    pst.save(a, pa)
    pst.save(b, pb)
    with pytest.raises(polyak.StructureError) as err:
        pst.merge([pa, pb], str(tmp_path / "m.safetensors"))
    text = str(err.value)
    assert "missing 1 tensor(s): 'c'" in text
    assert "unexpected 1 tensor(s): 'd'" in text
    assert "'a' (4,) != (3,)" in text
    assert "'b' float32 != float64" in text
    assert pb in text
    assert not os.path.exists(tmp_path / "m.safetensors")


def test_refuses_to_overwrite_an_input(tmp_path):
    paths, _ = _write_run(str(tmp_path), 2, lambda i: {"w": np.full(3, i, np.float32)})
    before = [open(p, "rb").read() for p in paths]
    with pytest.raises(OutputError, match="one of the inputs"):
        pst.merge(paths, paths[1])
    os.link(paths[0], str(tmp_path / "alias.safetensors"))
    with pytest.raises(OutputError, match="one of the inputs"):
        pst.merge(paths, str(tmp_path / "alias.safetensors"))
    os.makedirs(tmp_path / "s")
    sharded, _ = _sharded_run(str(tmp_path / "s"), 2, np.random.default_rng(0))
    with pytest.raises(OutputError, match="one of the inputs"):
        pst.merge(sharded, sharded[0])
    assert [open(p, "rb").read() for p in paths] == before


def test_bad_arguments(tmp_path):
    paths, _ = _write_run(str(tmp_path), 2, lambda i: {"w": np.full(3, i, np.float32)})
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(polyak.EmptyInputError):
        pst.merge([], out)
    with pytest.raises(polyak.PolyakError, match="sequence of checkpoint paths"):
        pst.merge(paths[0], out)
    with pytest.raises(polyak.WeightsError, match="3 weights but 2 checkpoints"):
        pst.merge(paths, out, [1, 2, 3])
    with pytest.raises(polyak.WeightsError, match="weight vector 1 has 1 weights but 2 check"):
        pst.merge_many(paths, [out, str(tmp_path / "n.safetensors")], [[1, 2], [1]])
    with pytest.raises(polyak.WeightsError):
        pst.merge(paths, out, [1, -1])
    with pytest.raises(polyak.PolyakError, match="max_shard_size"):
        pst.merge(paths, str(tmp_path / "d"), max_shard_size="5 parsecs")
    with pytest.raises(polyak.PolyakError, match="applies to a directory output"):
        pst.merge(paths, out, max_shard_size="1GB")
    with pytest.raises(polyak.PolyakError, match="applies to a directory output"):
        pst.plan_merge(paths, [out], [[1, 1]], max_shard_size=100)
    with pytest.raises(OutputError, match="does not exist"):
        pst.merge(paths, str(tmp_path / "no" / "such" / "m.safetensors"))
    for bad in (0, 2.5, "x", True):
        with pytest.raises(polyak.PolyakError, match="threads must be an int >= 1"):
            pst.merge(paths, out, threads=bad)
    two = [out, str(tmp_path / "n.safetensors")]
    for call in (pst.merge_many, pst.plan_merge):
        with pytest.raises(polyak.WeightsError, match="1 weight vectors for 2 outputs"):
            call(paths, two, [[1, 1]])
        with pytest.raises(OutputError, match="no outputs"):
            call(paths, [], [])
    for bad in ("complex64", np.complex128, "bf16", "int8", "nonsense"):
        with pytest.raises(polyak.DtypeError, match="accumulate_dtype=.* cannot be used"):
            pst.merge(paths, out, accumulate_dtype=bad)
    for bad in (0, -5, 2.5):
        with pytest.raises(polyak.PolyakError, match="chunk_elements must be an int >= 1"):
            pst.merge_many(paths, [out], [[1, 1]], chunk_elements=bad)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "d")


def test_natural_order_warning(tmp_path):
    paths, _ = _write_run(str(tmp_path), 11, lambda i: {"w": np.full(2, i, np.float32)},
                          name="epoch_{i}.safetensors")  # fmt: skip
    shuffled = sorted(paths)  # lexicographic: epoch_10 before epoch_2
    with pytest.warns(pst.OrderWarning, match="'epoch_10.safetensors' is given before"):
        pst.merge(shuffled, str(tmp_path / "m.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pst.merge(paths, str(tmp_path / "m.safetensors"))


def test_plan_merge_writes_nothing(tmp_path):
    paths, trees = _write_run(str(tmp_path), 3, _mixed(np.random.default_rng(6)))
    out = str(tmp_path / "m.safetensors")
    plan = pst.plan_merge(paths, [out], [polyak.weights(schedules.tail(2), 3)], normalize=False)
    assert not os.path.exists(out)
    assert plan.weights == (tuple(polyak.weights(schedules.tail(2), 3)),)
    float_bytes = sum(v.nbytes for v in trees[0].values() if v.dtype.kind not in "iub")
    int_bytes = sum(v.nbytes for v in trees[0].values() if v.dtype.kind in "iub")
    assert plan.bytes_to_read == 2 * float_bytes + int_bytes  # ints: the newest input only
    report = pst.merge(paths, out, schedules.tail(2))
    assert report.bytes_read == plan.bytes_to_read
    assert plan.buffer_bytes > 0 and plan.peak_memory_estimate(0) >= plan.buffer_bytes


def test_plan_merge_bytes_to_write_are_exact(tmp_path):
    # Long metadata and many tensors: a per-tensor guess of the header size misses them.
    paths, _ = _write_run(
        str(tmp_path), 3, lambda i: {f"layer.{k}.w": np.full(7, i, np.float32) for k in range(40)},
        metadata={"format": "pt", "config": "x" * 5000},
    )  # fmt: skip
    sched = schedules.ema(0.5)
    w = [polyak.weights(sched, 3)]
    for out, shard in [("m.safetensors", None), ("dir", None), ("dir2", "300B")]:
        out = str(tmp_path / out)
        plan = pst.plan_merge(paths, [out], w, max_shard_size=shard, schedules=[sched])
        assert not os.path.exists(out)
        report = pst.merge(paths, out, sched, max_shard_size=shard)
        assert len(report.files) > (2 if shard else 1 if out.endswith("dir") else 0)
        assert plan.bytes_to_write == (report.bytes_written,), out


# -- hypothesis: random checkpoints against a float64 reference ------------------------------

_names = st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=8)
_specs = st.dictionaries(
    _names,
    st.tuples(
        st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16]),
        st.lists(st.integers(0, 9), max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=5,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spec=_specs,
    n=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    schedule=st.sampled_from(["equal", "linear", "exponential"]),
    threads=st.integers(1, 3),
    chunk=st.integers(1, 50),
)
def test_random_checkpoints_against_float64_reference(
    tmp_path, spec, n, seed, schedule, threads, chunk
):
    rng = np.random.default_rng(seed)
    folder = tmp_path / f"h{seed}_{n}"
    folder.mkdir(exist_ok=True)
    paths, trees = _write_run(
        str(folder), n, lambda i: {k: _sample(rng, d, s) for k, (d, s) in spec.items()}
    )
    w = polyak.weights(schedule, n)
    out = str(folder / "merged.safetensors")
    pst.merge_many(paths, [out], [w], normalize=False, threads=threads, chunk_elements=chunk)
    got = pst.load(out)
    for name, (dtype, _) in spec.items():
        ref = sum(wi * t[name].astype(np.float64) for wi, t in zip(w, trees, strict=True))
        dt = np.dtype(dtype)
        eps = float(ml_dtypes.finfo(dt).eps)
        scale = sum(
            abs(wi) * np.abs(t[name].astype(np.float64)) for wi, t in zip(w, trees, strict=True)
        )
        # One rounding to the output dtype, plus float32 accumulation error (n terms).
        tol = scale * (eps + n * 2.0**-23) + float(ml_dtypes.finfo(dt).smallest_subnormal)
        assert got[name].dtype == dt and got[name].shape == ref.shape
        assert np.all(np.abs(got[name].astype(np.float64) - ref) <= tol), name


@pytest.mark.parametrize("threads", [1, 2])
def test_progress_reports_bytes_as_they_are_read(tmp_path, threads):
    # 12 MiB tensors: two work items each, six in all, so progress comes in several steps.
    paths, _ = _write_run(
        str(tmp_path), 3, lambda i: {k: np.full(3 << 20, i, np.float32) for k in "abc"}
    )
    calls = []
    report = pst.merge(
        paths, str(tmp_path / "m.safetensors"), threads=threads,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert len(calls) >= 2
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == report.bytes_read == 9 * (12 << 20)
    assert {t for _, t in calls} == {report.bytes_read}


def test_rewriting_a_sharded_output_removes_its_old_shards(tmp_path):
    paths, trees = _sharded_run(str(tmp_path), 2, np.random.default_rng(8))
    out = tmp_path / "merged"
    pst.merge(paths, str(out), max_shard_size="1KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    (out / "config.json").write_text("{}")  # not a shard: left alone
    pst.merge(paths, str(out), "linear")  # the input's layout: two shards
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    _assert_bitwise(pst.load(str(out)), polyak.average(trees, "linear"))
