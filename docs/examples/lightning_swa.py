"""Lightning: validate with an EMA of the weights, resume it from a checkpoint, export it.

A small regression network trained with a large constant learning rate: its last iterate
keeps bouncing around the optimum, its exponential moving average settles. The callback
folds the weights after every optimizer step, validation runs with the average, and the
average is saved in Lightning's checkpoints, so ``fit(ckpt_path=...)`` continues it.

Run: ``python docs/examples/lightning_swa.py``
"""

from __future__ import annotations

import copy
import tempfile

import lightning.pytorch as pl
import torch

import polyak
import polyak.lightning


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(seed: int, n: int, shuffle: bool = False) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + torch.randn(n, 1, generator=g)  # noisy targets
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=shuffle)


def val_loss(model: torch.nn.Module, data: torch.utils.data.DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        return float(
            torch.stack([torch.nn.functional.mse_loss(model(x), y) for x, y in data]).mean()
        )


def main() -> None:
    torch.manual_seed(0)
    train, val = loader(0, 512), loader(1, 256)
    with tempfile.TemporaryDirectory() as root:
        ema = polyak.lightning.WeightAveraging(polyak.schedules.ema(0.99), start_step=64)
        checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        options = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=root)  # fmt: skip
        module = Regression()
        trainer = pl.Trainer(max_epochs=4, callbacks=[ema, checkpoints], **options)
        trainer.fit(module, train, val)
        print(f"after 4 epochs: validation loss {trainer.callback_metrics['val_loss']:.4f} "
              f"(of the average, {ema.averager.count} steps folded)")  # fmt: skip

        # A new process would do the same: a new callback continues the saved average.
        resumed = polyak.lightning.WeightAveraging(polyak.schedules.ema(0.99), start_step=64)
        trainer = pl.Trainer(max_epochs=8, callbacks=[resumed], **options)
        trainer.fit(Regression(), train, val, ckpt_path=f"{root}/last.ckpt")
        model = trainer.lightning_module

    averaged = resumed.averager.averaged_model()  # a copy holding the average, for export
    last, avg = val_loss(copy.deepcopy(model), val), val_loss(averaged, val)
    print(f"after 8 epochs: validation loss of the last weights {last:.4f}, of the EMA {avg:.4f}")
    assert avg < last


if __name__ == "__main__":
    main()
