"""polyak.SnapshotDir: one safetensors file per step, pruned, averaged with any schedule.

Files are checked with the official ``safetensors`` reader; averages against
``polyak.average`` of the original in-memory snapshots.
"""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import polyak
from polyak import schedules as S
from polyak._errors import EmptyInputError, PolyakError


def _snapshot(rng, step):
    return {
        "dense": {
            "kernel": rng.normal(size=(7, 3)).astype(np.float32),
            "bias": rng.normal(size=3),
        },
        "emb": rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16),
        "step": np.int64(step),
    }


def test_save_writes_one_file_per_step_with_the_step_in_name_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    snaps = polyak.SnapshotDir(tmp_path / "snaps")
    assert not (tmp_path / "snaps").exists()  # created on the first save
    written = {step: _snapshot(rng, step) for step in (3, 250, 41)}
    for step, params in written.items():
        snaps.save(params, step, metadata={"gamma": "6.94", "t": str(step + 1)})
    names = sorted(os.listdir(tmp_path / "snaps"))
    assert names == [
        "snapshot-0000000003.safetensors",
        "snapshot-0000000041.safetensors",
        "snapshot-0000000250.safetensors",
    ]
    for step, params in written.items():
        path = tmp_path / "snaps" / f"snapshot-{step:010d}.safetensors"
        with safe_open(str(path), framework="np") as f:
            assert f.metadata() == {"polyak.step": str(step), "gamma": "6.94", "t": str(step + 1)}
        tensors = load_file(str(path))
        assert set(tensors) == {"dense.kernel", "dense.bias", "emb", "step"}
        np.testing.assert_array_equal(tensors["dense.kernel"], params["dense"]["kernel"])
        assert tensors["emb"].tobytes() == params["emb"].tobytes()
    assert snaps.metadata(41)["t"] == "42"
    assert snaps.steps() == [3, 41, 250] and len(snaps) == 3


def test_paths_are_ordered_by_step_not_by_name(tmp_path):
    snaps = polyak.SnapshotDir(tmp_path)
    snaps.save({"w": np.zeros(1)}, 10)
    snaps.save({"w": np.zeros(1)}, 10**11)  # wider than the zero padding
    # a file copied in by hand, unpadded: by name it sorts after step 10**11
    polyak.safetensors.save({"w": np.zeros(1)}, tmp_path / "snapshot-7.safetensors")
    (tmp_path / "notes.txt").write_text("not a snapshot")
    (tmp_path / "snapshot-x.safetensors").write_bytes(b"")
    assert snaps.steps() == [7, 10, 10**11]
    assert [p.name for p in snaps.paths()] == [
        "snapshot-7.safetensors",
        "snapshot-0000000010.safetensors",
        "snapshot-100000000000.safetensors",
    ]
    assert sorted(p.name for p in snaps.paths()) != [p.name for p in snaps.paths()]


def test_keep_prunes_to_the_newest(tmp_path):
    snaps = polyak.SnapshotDir(tmp_path, keep=3)
    for step in range(8):
        snaps.save({"w": np.full(2, float(step))}, step)
        assert len(snaps) == min(step + 1, 3)
    assert snaps.steps() == [5, 6, 7]
    snaps.save({"w": np.zeros(2)}, 6)  # saving a step again replaces it
    assert snaps.steps() == [5, 6, 7]
    np.testing.assert_array_equal(load_file(str(snaps.paths()[1]))["w"], np.zeros(2))
    assert sorted(os.listdir(tmp_path)) == [p.name for p in snaps.paths()]  # no temp files


@pytest.mark.parametrize(
    "schedule", [S.tail(3), S.tail(fraction=0.5), S.equal(), S.linear(), S.ema(0.8)], ids=repr
)
def test_average_in_memory_equals_polyak_average(tmp_path, schedule):
    rng = np.random.default_rng(1)
    params = [_snapshot(rng, step) for step in range(6)]
    snaps = polyak.SnapshotDir(tmp_path)
    for step, p in enumerate(params):
        snaps.save(p, step * 100)
    got = snaps.average(schedule)
    ref = polyak.average(params, schedule)
    assert got["dense.kernel"].tobytes() == ref["dense"]["kernel"].tobytes()
    assert got["dense.bias"].tobytes() == ref["dense"]["bias"].tobytes()
    assert got["emb"].dtype == ref["emb"].dtype
    assert got["emb"].tobytes() == ref["emb"].tobytes()
    assert got["step"] == 5  # int_policy="last": the newest snapshot's
    # and against a float64 reference, independently of polyak.average
    w = schedule.weights(6)
    ref64 = sum(wi * p["dense"]["bias"] for wi, p in zip(w, params))
    np.testing.assert_allclose(got["dense.bias"], ref64, rtol=1e-13)


@pytest.mark.parametrize("int_policy", ["last", "first", "average"])
def test_in_memory_average_loads_only_the_snapshots_it_weighs(tmp_path, monkeypatch, int_policy):
    import polyak.safetensors as pst

    rng = np.random.default_rng(3)
    params = [_snapshot(rng, step) for step in range(8)]
    snaps = polyak.SnapshotDir(tmp_path)
    for step, p in enumerate(params):
        snaps.save(p, step)
    loaded = []
    real_load = pst.load

    def load(path, *args, **kwargs):
        loaded.append(snaps.paths().index(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(pst, "load", load)
    got = snaps.average(S.tail(3), int_policy=int_policy)
    # tail(3) of 8: the newest 3, and the oldest for int_policy="first"; not the 4 others
    # (the one read rule, _accumulate.inputs_to_read: "last" and "average" need no oldest)
    assert loaded == ([0, 5, 6, 7] if int_policy == "first" else [5, 6, 7])
    ref = polyak.average(params, S.tail(3), int_policy=int_policy)
    assert got["dense.kernel"].tobytes() == ref["dense"]["kernel"].tobytes()
    assert got["emb"].tobytes() == ref["emb"].tobytes()
    assert got["step"] == ref["step"]
    # a weight-0 snapshot that does not match the others is still refused, by its index
    snaps.save({**params[2], "emb": np.zeros((4, 3), ml_dtypes.bfloat16)}, 2)
    with pytest.raises(PolyakError, match=r"snapshots\[2\]\['emb'\]: shape \(4, 3\)"):
        snaps.average(S.tail(3), int_policy=int_policy)


def test_merging_the_files_streams_the_same_result(tmp_path):
    # SnapshotDir only stores; streaming to a file is polyak.safetensors.merge of its paths.
    rng = np.random.default_rng(2)
    snaps = polyak.SnapshotDir(tmp_path / "snaps", keep=4)
    for step in range(7):
        snaps.save(_snapshot(rng, step), step)
    in_memory = snaps.average(S.tail(2))
    out = tmp_path / "avg.safetensors"
    polyak.safetensors.merge(snaps.paths(), out, S.tail(2))
    with pytest.raises(TypeError):
        snaps.average(S.tail(2), output=out)  # average() always returns a pytree
    merged = load_file(str(out))
    assert set(merged) == set(in_memory)
    for name in merged:
        assert merged[name].dtype == in_memory[name].dtype
        assert merged[name].tobytes() == in_memory[name].tobytes(), name


def test_torch_state_dict_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(torch.bfloat16)
    snaps = polyak.SnapshotDir(tmp_path, keep=5)
    states = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 4, dtype=torch.bfloat16))  # moves BN stats and the counter
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        snaps.save(model.state_dict(), step)
    averaged = snaps.average(S.tail(3))
    assert set(averaged) == set(model.state_dict())
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in averaged.items()})
    ref = polyak.average(states, S.tail(3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert int(model.state_dict()["1.num_batches_tracked"]) == 5


def test_bad_input(tmp_path):
    with pytest.raises(PolyakError, match="keep must be a positive int"):
        polyak.SnapshotDir(tmp_path, keep=0)
    for bad in (1.5, True, np.int64(0), "3"):
        with pytest.raises(PolyakError, match="keep must be a positive int"):
            polyak.SnapshotDir(tmp_path, keep=bad)
    assert polyak.SnapshotDir(tmp_path, keep=np.int64(3)).keep == 3  # as steps accept them
    (tmp_path / "file").write_text("x")
    with pytest.raises(PolyakError, match="is a file"):
        polyak.SnapshotDir(tmp_path / "file")
    snaps = polyak.SnapshotDir(tmp_path / "snaps")
    with pytest.raises(EmptyInputError, match="no snapshot"):
        snaps.average()
    with pytest.raises(PolyakError, match="step must be an int >= 0"):
        snaps.save({"w": np.ones(1)}, -1)
    with pytest.raises(PolyakError, match="step must be an int >= 0"):
        snaps.save({"w": np.ones(1)}, 1.5)
    with pytest.raises(PolyakError, match="strings to strings"):
        snaps.save({"w": np.ones(1)}, 1, metadata={"t": 3})
    with pytest.raises(PolyakError, match="reserved"):
        snaps.save({"w": np.ones(1)}, 1, metadata={"polyak.step": "2"})
    with pytest.raises(PolyakError, match="no snapshot of step 4"):
        snaps.metadata(4)
    # a leaf safetensors cannot store: nothing is written, nothing is left behind
    snaps.save({"w": np.ones(1)}, 1)
    with pytest.raises(PolyakError, match="complex"):
        snaps.save({"w": np.ones(1, np.complex128)}, 2)
    assert os.listdir(tmp_path / "snaps") == ["snapshot-0000000001.safetensors"]
    # snapshots that do not match name the offending file or tensor
    snaps.save({"w": np.ones(2)}, 3)
    with pytest.raises(PolyakError, match=r"\['w'\]"):
        snaps.average()


def test_import_polyak_does_not_load_the_safetensors_adapter():
    code = (
        "import sys, polyak\n"
        "assert 'polyak._snapshots' not in sys.modules\n"
        "assert 'polyak.safetensors' not in sys.modules\n"
        "for name in ('torch', 'jax', 'keras', 'safetensors'):\n"
        "    assert name not in sys.modules, name\n"
        "polyak.SnapshotDir\n"
        "assert 'polyak._snapshots' in sys.modules\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
