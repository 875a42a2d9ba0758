"""The benchmark suite runs from a clone and measures what it says (no timing asserted here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _harness  # noqa: E402

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="peak RSS is read the Linux way"
)


def test_peak_rss_is_the_child_own_not_the_parent(tmp_path: Path) -> None:
    # The parent holds 400 MiB: a child spawned straight from it would report at least that
    # (Linux carries the exec'ing address space's high-water mark over). The launcher must
    # report each child's own peak instead, which grows with what the child allocates.
    parent_ballast = np.ones(400 * 2**20 // 8)
    script = tmp_path / "alloc.py"
    script.write_text(
        "import json, sys\nimport numpy as np\n"
        "a = np.ones(int(sys.argv[1]) * 2**20 // 8)\nprint(json.dumps({'mib': sys.argv[1]}))\n"
    )
    small = _harness.run_child([str(script), "1"])["peak_rss_mib"]
    big = _harness.run_child([str(script), "600"])["peak_rss_mib"]
    assert small < 200, small
    assert 580 < big - small < 700, (small, big)
    assert parent_ballast.sum() > 0


def test_run_child_reports_a_failing_child(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit('no such checkpoint: x.safetensors')\n")
    with pytest.raises(RuntimeError, match="no such checkpoint"):
        _harness.run_child([str(script)])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
def test_quick_run_writes_the_tables_and_checks_every_method(tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out),
         "--workdir", str(work)],
        cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    cases = {"f32 N=2", "f32 N=8", "f32 N=32", "bf16 N=8", "f32 N=8 sharded"}
    assert {r["case"] for r in rows} >= cases
    for case in cases:
        mine = {r["method"]: r for r in rows if r["case"] == case}
        assert {"polyak 1 thread", "polyak 2 threads", "read (warm cache)", "np.copyto",
                "safe_open + accumulate", "tutorial np.average"} <= set(mine)  # fmt: skip
        # Every merge output was checked against the float64 reference.
        bound = 1e-2 if case.startswith("bf16") else 1e-6
        for method, r in mine.items():
            if method in ("read (warm cache)", "np.copyto") or "skipped" in r:
                continue
            assert 0 <= r["max_abs_err"] < bound, (case, method, r["max_abs_err"])
            assert r["peak_rss_mib"] > 5 and r["gb_per_s"] > 0
        # Every method's throughput is compared with the read of the same files.
        assert mine["read (warm cache)"]["of_read"] == pytest.approx(1.0)
    # The torch-input case: the same checkpoints as .pt and as safetensors, both checked.
    torch_rows = {r["method"]: r for r in rows if r["case"] == "f32 N=3 torch .pt"}
    for method in ("polyak.merge .pt", "polyak.merge .safetensors"):
        assert 0 <= torch_rows[method]["max_abs_err"] < 1e-6, method
        assert torch_rows[method]["peak_rss_mib"] > 5 and torch_rows[method]["gb_per_s"] > 0
    assert any(r["case"].startswith("in-memory") for r in rows)
    assert any(r["case"].startswith("online") for r in rows)
    scaling = results["scaling"]
    assert {r["axis"] for r in scaling} == {"n", "size"}
    md = (out / "RESULTS.md").read_text()
    assert "| case | inputs | method | seconds |" in md and "memory_scaling.png" in md
    assert (out / "memory_scaling.png").stat().st_size > 10_000
    # Generated checkpoints are cleaned up as their cases finish.
    assert not list(work.rglob("*.safetensors")) and not list(work.rglob("*.pt"))
