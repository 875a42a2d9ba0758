"""The training-loop examples in docs/examples/ run, with few steps, as a user would run them."""

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
    ("script", "needs"),
    [("numpy_sgd.py", None), ("torch_loop.py", "torch"), ("jax_loop.py", "jax")],
)
def test_example_runs(script, needs, tmp_path):
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--steps", "40"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snapshots averaged: 40" in proc.stdout
    assert "nan" not in proc.stdout.lower()
