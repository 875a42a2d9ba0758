"""One Lightning fit sharded with FSDP2 on 2 CPU processes (gloo), for test_lightning_fsdp.py.

Lightning's ``ModelParallelStrategy`` launches the second process by running this script
again. Usage: ``python lightning_fsdp_run.py OUT MODE`` with MODE one of

- ``full``: 4 epochs; also records every step's full (gathered) weights;
- ``first``: 2 epochs, saving a (distributed) checkpoint to OUT/ckpt;
- ``resume``: ``fit(ckpt_path=OUT/ckpt)`` to 4 epochs.

Rank 0 writes OUT/MODE.pt: the gathered average, its count, the recorded steps and what the
averaged parameters were (DTensor or not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import polyak
import polyak.lightning


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 16)
        self.b = torch.nn.Linear(16, 1)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.a, mesh=mesh)
        fully_shard(self.b, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def gathered(tree: dict) -> dict:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in tree.items()}


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = gathered(pl_module.state_dict())


def main(out: Path, mode: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    avg = polyak.lightning.WeightAveraging(polyak.schedules.ema(0.8), every_n_steps=2)
    rec = Recorder()
    callbacks = [rec, avg]
    if mode == "first":
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out, filename="ckpt"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2 if mode == "first" else 4,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=mode == "first",
        default_root_dir=out,
    )
    module = Net()
    trainer.fit(module, data, ckpt_path=out / "ckpt.ckpt" if mode == "resume" else None)
    value = avg.averager.value
    sharded = all(isinstance(v, DTensor) for k, v in value.items())
    full = gathered(value)
    if trainer.global_rank == 0:
        torch.save(
            {"value": full, "count": avg.averager.count, "steps": rec.steps, "sharded": sharded},
            out / f"{mode}.pt",
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
