"""polyak.lightning.WeightAveraging under Lightning's ModelParallelStrategy (FSDP2), for real.

Two CPU processes with the gloo backend, launched by Lightning itself (lightning_fsdp_run.py):
the module's parameters are DTensors sharded with ``fully_shard``, and so is the average.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch")
pytest.importorskip("polyak.torch")
if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

import polyak  # noqa: E402
from polyak.torch import ModelAverager  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "lightning_fsdp_run.py"
ROOT = SCRIPT.parent.parent


def run(out: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), mode],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out / f"{mode}.pt", weights_only=True)


@pytest.mark.slow
def test_sharded_average_equals_unsharded_fold_and_resumes_exactly(tmp_path):
    full = run(tmp_path, "full")
    assert full["sharded"]  # the average holds DTensors, like the parameters
    folded = list(range(2, 17, 2))  # 4 epochs x 4 steps per rank, every_n_steps=2
    assert full["count"] == len(folded)

    holder = torch.nn.Module()
    holder.a, holder.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 1)
    by_hand = ModelAverager(holder, polyak.schedules.ema(0.8))
    for s in folded:
        holder.load_state_dict(full["steps"][s])
        by_hand.update()
    for k, v in by_hand.value.items():
        assert torch.equal(full["value"][k], v), k

    run(tmp_path, "first")  # 2 epochs, distributed checkpoint
    resumed = run(tmp_path, "resume")
    assert resumed["count"] == full["count"]
    for k, v in full["value"].items():
        assert torch.equal(resumed["value"][k], v), k
