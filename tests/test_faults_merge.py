"""Merge-level faults of issue 13 whose fixes live in the merge, the kernel, the CLI,
the schedules and SnapshotDir: items 1, 5, 6, 7, 11, 17, 19, 20, 21 and 22. Each test
reproduced its failure before the fix (most were strict xfails until then).
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import polyak
import polyak.safetensors as pst

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _inputs(folder, values, dtype=np.float32, elements=300_000) -> list[str]:
    paths = []
    for i, v in enumerate(values):
        p = os.path.join(folder, f"in_{i}.safetensors")
        pst.save({"w": np.full(elements, v, dtype)}, p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("change", ["rewrite in place", "truncate and re-extend"])
def test_an_input_changed_during_the_merge_fails_and_leaves_no_output(tmp_path, change):
    paths = _inputs(str(tmp_path), [1.0, 2.0])
    out = str(tmp_path / "out.safetensors")
    victim = paths[1]
    size = os.path.getsize(victim)
    done = [False]

    def progress(read: int, total: int) -> None:
        if done[0]:
            return
        done[0] = True  # once the merge is under way, another program touches an input
        if change == "rewrite in place":
            with open(victim, "r+b") as f:
                f.seek(size - 4)
                f.write(np.float32(9.0).tobytes())
        else:
            with open(victim, "r+b") as f:
                f.truncate(size // 2)
                f.truncate(size)

    with pytest.raises(pst.CheckpointError, match="in_1.safetensors.*changed"):
        pst.merge(paths, out, progress=progress, threads=1)
    assert not os.path.exists(out)


def test_nested_outputs_are_refused_up_front(tmp_path):
    paths = _inputs(str(tmp_path), [1.0, 3.0], elements=10)
    d = str(tmp_path / "d")
    pst.merge(paths, d)  # a previous output: the nested file's folder exists
    before = sorted(os.listdir(d))
    for outs in ([d, os.path.join(d, "model.safetensors")], [os.path.join(d, "x"), d]):
        with pytest.raises(polyak.PolyakError, match="inside"):
            pst.merge_many(paths, outs, [[1, 0], [0, 1]])
        assert sorted(os.listdir(d)) == before


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_finite_inputs_near_the_maximum_average_to_a_finite_value(tmp_path, dtype):
    big = float(ml_dtypes.finfo(dtype).max) * 0.99
    paths = _inputs(str(tmp_path), [big, big], dtype=dtype, elements=16)
    out = str(tmp_path / "out.safetensors")
    pst.merge(paths, out)
    got = pst.load(out)["w"].astype(np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, float(np.asarray(big, dtype)), rtol=1e-2)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_int_average_of_extreme_integers_is_exact(tmp_path, dtype):
    top = int(np.iinfo(dtype).max)
    paths = []
    for i in range(2):
        p = str(tmp_path / f"in_{i}.safetensors")
        pst.save({"n": np.array([top, top - 1], dtype)}, p)
        paths.append(p)
    out = str(tmp_path / "out.safetensors")
    pst.merge(paths, out, int_policy="average")
    assert pst.load(out)["n"].tolist() == [top, top - 1]


def test_int64_average_is_the_rounded_exact_mean_where_float64_cannot_hold_it(tmp_path):
    # 2**62 + 1 and 2**62 + 3 have no float64: their float64 mean was 2**62.
    paths = []
    for i, v in enumerate([2**62 + 1, 2**62 + 3]):
        p = str(tmp_path / f"in_{i}.safetensors")
        pst.save({"n": np.array([v, -v], np.int64)}, p)
        paths.append(p)
    out = str(tmp_path / "out.safetensors")
    pst.merge(paths, out, int_policy="average")
    assert pst.load(out)["n"].tolist() == [2**62 + 2, -(2**62) - 2]


def test_fp8_e4m3_output_saturates_like_torch(tmp_path):
    torch = pytest.importorskip("torch")
    values = np.array([500.0, -1000.0, 300.0, 448.0], np.float32)
    paths = []
    for i in range(2):
        p = str(tmp_path / f"in_{i}.safetensors")
        pst.save({"w": values}, p)
        paths.append(p)
    out = str(tmp_path / "out.safetensors")
    pst.merge(paths, out, dtype="fp8_e4m3")
    got = pst.load(out)["w"].astype(np.float32)
    ref = torch.from_numpy(values).to(torch.float8_e4m3fn).to(torch.float32).numpy()
    np.testing.assert_array_equal(got, ref)


def test_nan_and_inf_inputs_are_counted_and_warned(tmp_path):
    paths = _inputs(str(tmp_path), [1.0, 2.0], elements=10)
    bad = str(tmp_path / "in_1.safetensors")
    w = np.full(10, 2.0, np.float32)
    w[:3] = [np.nan, np.inf, -np.inf]
    pst.save({"w": w}, bad)
    report = pst.merge(paths, str(tmp_path / "out.safetensors"))
    assert report.nonfinite == 3
    proc = _cli("merge", *paths, "-o", str(tmp_path / "cli.safetensors"))
    assert proc.returncode == 0 and "NaN" in proc.stderr and "3" in proc.stderr


def test_snapshotdir_never_prunes_the_snapshot_it_just_wrote(tmp_path):
    old = polyak.SnapshotDir(tmp_path, keep=2)
    for step in (100, 200):
        old.save({"w": np.full(2, float(step))}, step=step)
    restarted = polyak.SnapshotDir(tmp_path, keep=2)
    with pytest.warns(UserWarning, match="step 5 .* newest") as rec:
        path = restarted.save({"w": np.zeros(2)}, step=5)
    assert rec[0].filename == __file__  # the caller's line
    assert os.path.exists(path)
    assert restarted.steps() == [5, 200]  # the oldest other snapshot went instead


def test_the_restarted_run_warning_points_at_the_caller_through_posthoc(tmp_path):
    ema = polyak.Averager(polyak.schedules.power(sigma_rel=0.05))
    ema.update({"w": np.zeros(2, np.float32)})
    snaps = polyak.SnapshotDir(tmp_path, keep=1)
    polyak.posthoc.save_snapshot(snaps, ema, 100)
    with pytest.warns(UserWarning, match="step 5 ") as rec:
        polyak.posthoc.save_snapshot(snaps, ema, 5)
    assert [w.filename for w in rec] == [__file__]


def test_snapshotdir_one_step_one_file(tmp_path):
    snaps = polyak.SnapshotDir(tmp_path)
    snaps.save({"w": np.ones(2)}, step=1)
    pst.save({"w": np.full(2, 5.0)}, str(tmp_path / "snapshot-1.safetensors"))
    with pytest.raises(polyak.PolyakError, match="step 1"):
        snaps.average()


@pytest.mark.parametrize(
    "args",
    [
        ["weights", "-n", "2", "--weights=1e308,1e308"],
        ["weights", "power", "--sigma-rel", "1e-300"],
        ["weights", "-n", "100000000000"],
    ],
)
def test_extreme_arguments_are_one_line_errors(args):
    proc = _cli(*args)
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
    assert "polyak" in proc.stderr


def test_mismatch_check_is_linear(tmp_path):
    """100k names that differ between two inputs: the error arrives (the former quadratic
    check took 104 s; the child gets 30)."""
    a = str(tmp_path / "a.safetensors")
    b = str(tmp_path / "b.safetensors")
    from safetensors.numpy import save_file

    save_file({f"a{i}": np.zeros(1, np.float32) for i in range(100_000)}, a)
    save_file({f"b{i}": np.zeros(1, np.float32) for i in range(100_000)}, b)
    proc = _cli("merge", a, b, "-o", str(tmp_path / "o.safetensors"), timeout=30)
    assert proc.returncode == 1 and "do not match" in proc.stderr


def test_inspect_escapes_control_characters(tmp_path):
    p = str(tmp_path / "m.safetensors")
    pst.save({"evil\x1b[2J\x07name": np.zeros(2, np.float32)}, p)
    proc = _cli("inspect", p)
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "evil" in proc.stdout


def test_weights_cli_rough_edges(tmp_path):
    paths = _inputs(str(tmp_path), [1.0, 3.0], elements=10)
    out = str(tmp_path / "o.safetensors")
    proc = _cli("merge", *paths, "-o", out, "--weights", "-1,2", "--no-normalize")
    assert proc.returncode == 0, proc.stderr
    assert pst.load(out)["w"][0] == 5.0
    proc = _cli("merge", *paths, "-o", out, "--weights", "1,,2")
    assert proc.returncode == 2 and "empty" in proc.stderr


def _plans(count: int, elements: int, dtype=np.float32):
    from polyak import _stream

    dt = np.dtype(dtype)
    return [
        _stream.TensorPlan(f"t{i}", dt, (elements,), dt, np.dtype(np.float32))
        for i in range(count)
    ]


def test_threads_are_chosen_from_the_work():
    """Item 19: many tiny tensors get one thread (threads only contend on the GIL there);
    large tensors get one thread per work item, up to the number asked for."""
    from polyak import _stream

    two = _stream.route([np.array([0.5, 0.5])], "last")
    assert _stream.choose_threads(_plans(100_000, 4), two, 8) == 1
    assert _stream.choose_threads(_plans(3, 4 << 20), two, 8) == 6  # 2 spans of 8 MiB each
    assert _stream.choose_threads(_plans(3, 4 << 20), two, 4) == 4
    assert _stream.choose_threads(_plans(3, 4 << 20), two, 1) == 1
    # a few large tensors beside many tiny ones: the large ones dominate the bytes
    mixed = _plans(10_000, 4) + _plans(2, 1 << 20)
    assert _stream.choose_threads(mixed, two, 8) == 2


def test_tiny_tensor_checkpoints_are_merged_with_one_thread(tmp_path):
    from safetensors.numpy import save_file

    paths = []
    for i in range(2):
        p = str(tmp_path / f"in_{i}.safetensors")
        save_file({f"t{k}": np.full(3, float(i), np.float32) for k in range(5000)}, p)
        paths.append(p)
    out = str(tmp_path / "out.safetensors")
    assert pst.plan_merge(paths, [out], [None], threads=8).threads == 1
    report = pst.merge(paths, out, threads=8)
    assert report.threads == 1
    np.testing.assert_array_equal(pst.load(out)["t4999"], np.full(3, 0.5, np.float32))


def test_dry_run_buffer_estimate_is_what_the_run_allocates(tmp_path, monkeypatch):
    """Item 20: plan_merge's buffer_bytes equals the bytes the executor's per-thread buffers
    take, measured by recording every buffer set the run creates."""
    from polyak import _stream

    made: list[int] = []
    real = _stream._Buffers

    class Recorded(real):
        def __init__(self, spec):
            super().__init__(spec)
            made.append(sum(a.nbytes for a in (self.x, self.out, self.scratch, *self.accs)))

    monkeypatch.setattr(_stream, "_Buffers", Recorded)
    paths = []
    for i in range(3):
        p = str(tmp_path / f"in_{i}.safetensors")
        pst.save(
            {
                "a": np.full(1 << 20, float(i), ml_dtypes.bfloat16),
                "b": np.full(1 << 20, float(i), np.float32),
            },
            p,
        )
        paths.append(p)
    outs = [str(tmp_path / "o1.safetensors"), str(tmp_path / "o2.safetensors")]
    for threads in (1, 8):
        made.clear()
        plan = pst.plan_merge(paths, [outs[0]], [None], dtype="float16", threads=threads)
        pst.merge(paths, outs[0], dtype="float16", threads=threads)
        assert plan.threads == min(threads, 2)  # two work items: one per tensor
        assert len(made) <= plan.threads and set(made) == {plan.buffer_bytes // plan.threads}
        if threads == 1:
            assert made == [plan.buffer_bytes]


@pytest.mark.parametrize(
    "call",
    [
        lambda: polyak.schedules.power(6.94).decay(10**400),
        lambda: polyak.schedules.polynomial(1.0).decay(10**400),
        lambda: polyak.schedules.ema_warmup().decay(10**5000),
        lambda: polyak.schedules.equal().weights(10**400),
        lambda: polyak.schedules.power(10**400),
        lambda: polyak.schedules.power(float("inf")),
        lambda: polyak.schedules.explicit([10**400, 1]),
        lambda: polyak.schedules.sigma_rel_to_gamma(10**400),
        lambda: polyak.posthoc.profile(10**400, 6.94, [1.0]),
        lambda: polyak.posthoc.profile(10.0, 6.94, [10**400]),
        lambda: polyak.posthoc.solve([(10**400, 6.94), (10.0, 16.97)], 0.1),
        lambda: polyak.posthoc.snapshot_metadata(10**400, 6.94),
    ],
)
def test_huge_t_and_parameters_are_one_line_errors(call):
    """Item 11: t=10**400 and friends raised OverflowError from float()."""
    with pytest.raises(polyak.PolyakError) as info:
        call()
    assert len(str(info.value)) < 300 and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("polyak.schedule", '{"name": "power", "params": {"gamma": 1e400}}'),
        ("polyak.schedule", '{"name": "ema", "params": [0.9]}'),
        ("polyak.schedule", "[]"),
        ("polyak.count", str(10**400)),
        ("polyak.count", "1e5"),
        ("polyak.dtypes", '{"w": 1}'),
        ("polyak.int_policy", "sometimes"),
    ],
    ids=["gamma-1e400", "params-list", "schedule-list", "count-10**400", "count-float",
         "dtypes-int", "int-policy"],
)  # fmt: skip
def test_averager_load_of_malformed_metadata_is_a_one_line_error(tmp_path, key, value):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    av = polyak.Averager(polyak.schedules.power(6.94))
    av.update({"w": np.ones(3, np.float32)})
    good = str(tmp_path / "good.safetensors")
    av.save(good)
    with safe_open(good, "np") as f:
        meta = {**f.metadata(), key: value}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, meta)
    with pytest.raises(polyak.PolyakError, match="bad.safetensors: malformed") as info:
        polyak.Averager.load(bad)
    assert "\n" not in str(info.value)


def test_snapshotdir_mismatch_messages_name_the_file(tmp_path):
    """Item 22: where the file is known, messages name it, not ``snapshots[1]``."""
    snaps = polyak.SnapshotDir(tmp_path)
    snaps.save({"w": np.ones(2), "b": np.ones(1)}, step=1)
    snaps.save({"w": np.ones(2)}, step=2)
    with pytest.raises(polyak.PolyakError, match=r"snapshot-0000000002\.safetensors") as info:
        snaps.average()
    assert "snapshots[" not in str(info.value)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_in_memory_average_near_the_maximum_stays_finite_and_equals_the_merge(tmp_path, dtype):
    big = float(ml_dtypes.finfo(dtype).max) * 0.99
    x = np.linspace(-big, big, 1001).astype(dtype)
    snaps = [{"w": x}, {"w": x[::-1].copy()}, {"w": x}]
    got = polyak.average(snaps, "linear")["w"]
    assert np.all(np.isfinite(got.astype(np.float64)))
    ref = x.astype(np.float64) * (1 / 6 + 3 / 6) + x[::-1].astype(np.float64) * 2 / 6
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-2, atol=big * 1e-6)
    paths = []
    for i, snap in enumerate(snaps):
        paths.append(str(tmp_path / f"in_{i}.safetensors"))
        pst.save(snap, paths[-1])
    pst.merge(paths, str(tmp_path / "out.safetensors"), "linear")
    assert pst.load(str(tmp_path / "out.safetensors"))["w"].tobytes() == got.tobytes()
