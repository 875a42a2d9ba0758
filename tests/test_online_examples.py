"""The training-loop examples in docs/examples/ (numpy, torch, JAX, Lightning, the HF Trainer)
run as a user would run them, the plain loops with few steps."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


@pytest.mark.parametrize(
    ("script", "needs", "argv", "expect"),
    [
        ("numpy_sgd.py", None, ["--steps", "40"], "snapshots averaged: 40"),
        ("torch_loop.py", "torch", ["--steps", "40"], "snapshots averaged: 40"),
        ("jax_loop.py", "jax", ["--steps", "40"], "snapshots averaged: 40"),
        ("lightning_swa.py", "lightning", [], "validation loss"),
        ("transformers_ema.py", "transformers", [], "eval loss"),
    ],
)
def test_example_runs(script, needs, argv, expect, tmp_path):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
    assert "nan" not in proc.stdout.lower()
