"""benchmarks/torch_averager.py runs from a clone and its methods agree (no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import torch_averager  # noqa: E402


def test_quick_run_times_every_method_and_checks_them_against_polyak(capsys):
    results = torch_averager.main(["--quick", "--rounds", "2"])
    assert [r["shape"] for r in results] == [
        "ResNet-50-shaped", "1000 x Linear(8, 8)", "GPT-2-small-shaped bf16",
    ]  # fmt: skip
    resnet = results[0]
    # The hand-written layout has ResNet-50's structure: 53 conv + BN pairs and the fc.
    assert resnet["tensors"] == 53 * 6 + 2
    for res in results:
        rows = res["rows"]
        assert {"polyak ModelAverager", "hand-written foreach"} <= set(rows)
        assert res["ratio"] > 0 and res["fastest_peer"] != "polyak ModelAverager"
        for method, row in rows.items():
            assert row["median_ms"] > 0, method
            # Every method folded the same models: the averages agree to rounding.
            assert row["max_abs_err"] < 1e-5, (res["shape"], method, row)
    assert "torch AveragedModel" in results[0]["rows"]
    assert "torch AveragedModel" not in results[2]["rows"]  # no float32 average of bf16
    assert "polyak / fastest peer" in capsys.readouterr().out
