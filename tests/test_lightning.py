"""polyak.lightning.WeightAveraging in real Lightning fits, on CPU.

References: the snapshots a separate callback records after every optimizer step, folded
by hand into a ModelAverager (bit for bit) and averaged in float64 numpy; the validation
loss of the average computed by hand; an uninterrupted fit for resuming.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("polyak.torch")

import polyak  # noqa: E402
import polyak.lightning  # noqa: E402
from polyak.torch import ModelAverager  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(seed: int, n: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Recorder(pl.Callback):
    """Copies of the module's state after each optimizer step and around validations."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.val_start: list[dict] = []
        self.val_end: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_validation_start(self, trainer, pl_module):
        self.val_start.append(copy.deepcopy(pl_module.state_dict()))

    def on_validation_end(self, trainer, pl_module):
        self.val_end.append(copy.deepcopy(pl_module.state_dict()))


def trainer(callbacks, tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 3)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
        deterministic=True,
        **kw,
    )


def fit(callbacks, tmp_path, *, val=True, ckpt_path=None, **kw):
    torch.manual_seed(0)
    module = Net()
    t = trainer(callbacks, tmp_path, **kw)
    t.fit(module, data(1, 64), data(2, 32) if val else None, ckpt_path=ckpt_path)
    return module, t


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_average_equals_model_averager_fed_by_hand(tmp_path):
    avg = polyak.lightning.WeightAveraging("equal", every_n_steps=3, start_step=5)
    rec = Recorder()
    module, _ = fit([rec, avg], tmp_path, val=False)  # 3 epochs x 8 batches
    assert sorted(rec.steps) == list(range(1, 25))
    folded = [s for s in range(1, 25) if s > 5 and (s - 5) % 3 == 0]
    assert folded == [8, 11, 14, 17, 20, 23]
    assert avg.averager.count == len(folded)

    holder = Net()
    by_hand = ModelAverager(holder, "equal")
    for s in folded:
        holder.load_state_dict(rec.steps[s])
        by_hand.update()
    assert_same(avg.averager.value, by_hand.value)
    assert list(avg.averager.value) == list(module.state_dict())  # the module's own keys

    # Independent of polyak's arithmetic: the float64 mean of the same snapshots.
    for k, v in avg.averager.value.items():
        stack = np.stack([rec.steps[s][k].double().numpy() for s in folded])
        want = stack.mean(0) if v.is_floating_point() else stack[-1]
        np.testing.assert_allclose(v.double().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=k)
    # swap_on_end=False: the module keeps its own last weights.
    assert_same(module.state_dict(), rec.steps[24])


def evaluate(model: torch.nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(model(x), y) for x, y in loader]
    return float(torch.stack(losses).mean())


def test_validation_and_test_use_the_average_and_restore_the_weights(tmp_path):
    before, avg, after = (
        Recorder(),
        polyak.lightning.WeightAveraging(polyak.schedules.ema(0.9)),
        Recorder(),
    )
    module, t = fit([before, avg, after], tmp_path, num_sanity_val_steps=0)
    assert len(before.val_start) == 3  # one validation per epoch
    for raw, swapped, back in zip(before.val_start, after.val_start, after.val_end):
        assert_same(back, raw)  # bit for bit
        assert not torch.equal(swapped["net.0.weight"], raw["net.0.weight"])
    assert_same(after.val_start[-1], avg.averager.value)  # the last validation saw the average

    val_loss = float(t.callback_metrics["val_loss"])
    by_hand = evaluate(avg.averager.averaged_model(), data(2, 32))
    own = evaluate(copy.deepcopy(module), data(2, 32))
    assert val_loss == pytest.approx(by_hand, rel=1e-6)
    assert val_loss != pytest.approx(own, rel=1e-3)

    raw = copy.deepcopy(module.state_dict())
    result = t.test(module, data(3, 32), verbose=False)[0]
    assert result["test_loss"] == pytest.approx(
        evaluate(avg.averager.averaged_model(), data(3, 32)), rel=1e-6
    )
    assert_same(module.state_dict(), raw)


def test_swap_on_end_leaves_the_average_in_the_module(tmp_path):
    avg = polyak.lightning.WeightAveraging("equal", swap_on_end=True)
    module, _ = fit([avg], tmp_path, val=False, max_epochs=1)
    assert avg.averager.count == 8
    for k, v in module.state_dict().items():
        assert torch.equal(v, avg.averager.value[k].to(v.dtype)), k


def test_interrupted_and_resumed_fit_gives_the_same_average(tmp_path):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    full = polyak.lightning.WeightAveraging(
        polyak.schedules.ema(0.8), every_n_steps=2, start_step=3
    )
    full_module, _ = fit([full], tmp_path / "a", max_epochs=3)

    first = polyak.lightning.WeightAveraging(
        polyak.schedules.ema(0.8), every_n_steps=2, start_step=3
    )
    fit([first, ckpt], tmp_path / "b", max_epochs=2, enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert any("WeightAveraging" in key for key in saved["callbacks"])

    resumed = polyak.lightning.WeightAveraging(
        polyak.schedules.ema(0.8), every_n_steps=2, start_step=3
    )
    module, _ = fit(
        [resumed], tmp_path / "c", max_epochs=3, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    assert resumed.averager.count == full.averager.count == 10  # steps 5, 7, ..., 23
    assert_same(resumed.averager.value, full.averager.value)
    assert_same(module.state_dict(), full_module.state_dict())  # training itself resumed exactly


def test_snapshots_for_post_hoc_selection(tmp_path):
    raw = polyak.lightning.WeightAveraging("equal", snapshot_dir=tmp_path / "raw", keep=4)
    power = polyak.lightning.WeightAveraging(
        polyak.schedules.power(sigma_rel=0.1),
        snapshot_dir=tmp_path / "power",
        snapshot_every_n_steps=4,
    )
    rec = Recorder()
    fit([rec, raw, power], tmp_path, val=False, max_epochs=2)  # 16 steps
    assert raw.snapshots.steps() == [13, 14, 15, 16]
    tail = raw.snapshots.average("equal")
    for k, v in tail.items():
        stack = np.stack([rec.steps[s][k].double().numpy() for s in (13, 14, 15, 16)])
        want = stack.mean(0) if v.dtype.kind == "f" else stack[-1]
        np.testing.assert_allclose(np.asarray(v, np.float64), want, rtol=1e-6, atol=1e-7)
    found = polyak.posthoc.find_snapshots(tmp_path / "power")
    assert [t for _, t, _ in found] == [4.0, 8.0, 12.0, 16.0]
    with pytest.raises(polyak.PolyakError, match="already holds"):
        fit([polyak.lightning.WeightAveraging(snapshot_dir=tmp_path / "raw")], tmp_path, val=False)


def test_bad_arguments_are_named():
    with pytest.raises(polyak.PolyakError, match="every_n_steps"):
        polyak.lightning.WeightAveraging(every_n_steps=0)
    with pytest.raises(polyak.PolyakError, match="start_step"):
        polyak.lightning.WeightAveraging(start_step=-1)
    with pytest.raises(polyak.PolyakError, match="snapshot_every_n_steps must be an int >= 1"):
        polyak.lightning.WeightAveraging(snapshot_dir="snaps", snapshot_every_n_steps=0)
    with pytest.raises(polyak.NoOnlineFormError):
        polyak.lightning.WeightAveraging(polyak.schedules.tail(3))
    with pytest.raises(polyak.PolyakError, match="keep"):
        polyak.lightning.WeightAveraging(keep=2)
