"""``polyak posthoc`` end to end, through ``python -m polyak``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import polyak
from polyak import posthoc
from polyak import safetensors as pst
from polyak.schedules import power

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def polyak_cmd(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    """Two power EMAs of a random walk, saved every 20 of 200 steps, one directory each."""
    root = tmp_path_factory.mktemp("posthoc_cli") / "snaps"
    rng = np.random.default_rng(1)
    params = {"w": np.zeros((30, 20), np.float32), "b": np.zeros(20, np.float32)}
    emas = {s: polyak.Averager(power(sigma_rel=s)) for s in (0.05, 0.10)}
    dirs = {s: polyak.SnapshotDir(root / f"sigma-{s}") for s in emas}
    for step in range(1, 201):
        for v in params.values():
            v += rng.standard_normal(v.shape, np.float32)
        for ema in emas.values():
            ema.update(params)
        if step % 20 == 0:
            for s, ema in emas.items():
                meta = posthoc.snapshot_metadata(ema.count, ema.schedule.params["gamma"])
                dirs[s].save(ema.value, step, metadata=meta)
    return root


def test_posthoc_command_writes_each_sigma_rel(snaps, tmp_path):
    out = tmp_path / "emas"
    proc = polyak_cmd("posthoc", str(snaps), "--sigma-rel", "0.05,0.08,0.12", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "20 snapshots" in proc.stdout
    names = sorted(os.listdir(out))
    assert names == [f"ema-sigma_rel-{s}.safetensors" for s in ("0.05", "0.08", "0.12")]
    for s in (0.05, 0.08, 0.12):
        ref = tmp_path / f"ref-{s}.safetensors"
        posthoc.reconstruct(snaps, ref, sigma_rel=s)
        got, want = pst.load(out / f"ema-sigma_rel-{s}.safetensors"), pst.load(ref)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])

    at = tmp_path / "at100"
    proc = polyak_cmd(
        "posthoc", str(snaps / "sigma-0.05"), str(snaps / "sigma-0.1"),
        "--sigma-rel", "0.08", "--t", "100", "-o", str(at),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref-at100.safetensors"
    posthoc.reconstruct(snaps, ref, sigma_rel=0.08, t=100)
    np.testing.assert_array_equal(
        pst.load(at / "ema-sigma_rel-0.08.safetensors")["w"], pst.load(ref)["w"]
    )


def test_posthoc_dry_run_prints_coefficients_and_writes_nothing(snaps, tmp_path):
    out = tmp_path / "none"
    proc = polyak_cmd("posthoc", str(snaps), "--sigma-rel", "0.08", "-o", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "sigma_rel=0.08" in proc.stdout and "nothing was written" in proc.stdout
    coef = posthoc.solve([(t, g) for _, t, g in posthoc.find_snapshots(snaps)], 0.08)
    assert f"{coef.max():>10.6f}" in proc.stdout
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--sigma-rel", "0.3"], 1, "sigma_rel"),
        (["--sigma-rel", "0.05,x"], 2, "comma-separated numbers"),
        (["--sigma-rel", "0.05,0.050"], 2, "repeats"),
        (["--sigma-rel", "0.08", "--t", "1e6"], 1, "is after the last snapshot"),
    ],
)
def test_posthoc_command_errors(snaps, tmp_path, args, code, message):
    out = tmp_path / "out"
    proc = polyak_cmd("posthoc", str(snaps), "-o", str(out), *args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_posthoc_command_on_a_directory_without_snapshots(tmp_path):
    proc = polyak_cmd("posthoc", str(tmp_path), "--sigma-rel", "0.08", "-o", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "no snapshot" in proc.stderr and "Traceback" not in proc.stderr
