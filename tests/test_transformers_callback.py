"""polyak.transformers.WeightAveragingCallback in real Hugging Face Trainer runs, on CPU.

A one-layer GPT-2 built from a config (no downloads) is trained for a few steps. References:
the model's state after every step, recorded by a separate callback and folded by hand into a
ModelAverager; the loss of the average computed by hand; an uninterrupted run for resuming.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("polyak.torch")

import polyak  # noqa: E402
import polyak.transformers as ptf  # noqa: E402
from polyak.torch import ModelAverager  # noqa: E402

CONFIG = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
CONFIG.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int) -> None:
        g = torch.Generator().manual_seed(seed)
        # A learnable pattern: each sequence counts up from a random start, modulo 64.
        start = torch.randint(0, 64, (n, 1), generator=g)
        self.ids = (start + torch.arange(16)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


class Recorder(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps[state.global_step] = copy.deepcopy(model.state_dict())


def train(tmp, callbacks, *, max_steps=12, resume=None, net=None, **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        save_steps=6,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **kw,
    )
    trainer = transformers.Trainer(
        model=net if net is not None else model(),
        args=args,
        train_dataset=Tokens(1, 32),
        eval_dataset=Tokens(2, 16),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def by_hand(rec: Recorder, steps, schedule) -> ModelAverager:
    holder = model()
    avg = ModelAverager(holder, schedule)
    for s in steps:
        holder.load_state_dict(rec.steps[s])
        avg.update()
    return avg


def loaded(folder: Path) -> dict:
    return transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()


def test_saved_average_folders_load_and_equal_the_manual_average(tmp_path):
    rec, cb = Recorder(), ptf.WeightAveragingCallback("equal", every_n_steps=2, start_step=1)
    trainer = train(tmp_path, [rec, cb])
    assert sorted(rec.steps) == list(range(1, 13))
    for step, folded in ((6, [3, 5]), (12, [3, 5, 7, 9, 11])):
        want = by_hand(rec, folded, "equal").value
        got = loaded(tmp_path / f"checkpoint-{step}" / "average")
        for k, v in got.items():
            assert torch.equal(v, want[k]), (step, k)
    final = loaded(tmp_path / "average")
    for k, v in final.items():
        assert torch.equal(v, cb.averager.value[k]), k
    # The model keeps its own weights.
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, rec.steps[12][k]), k


def eval_loss(net: torch.nn.Module, tmp: Path) -> float:
    """The Trainer's own evaluation of ``net`` (its loss normalisation included)."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp), per_device_eval_batch_size=8, report_to=[], use_cpu=True
    )
    trainer = transformers.Trainer(model=net, args=args, eval_dataset=Tokens(2, 16))
    return trainer.evaluate()["eval_loss"]


def test_evaluation_during_training_reports_the_average(tmp_path):
    rec, cb = Recorder(), ptf.WeightAveragingCallback(polyak.schedules.ema(0.7))
    trainer = train(tmp_path, [rec, cb], eval_strategy="steps", eval_steps=6)
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    assert sorted(evals) == [6, 12]
    for step in (6, 12):
        net = transformers.GPT2LMHeadModel.from_pretrained(
            tmp_path / f"checkpoint-{step}" / "average"
        )
        assert evals[step] == pytest.approx(eval_loss(net, tmp_path / "e"), rel=1e-6)
        raw = model()
        raw.load_state_dict(rec.steps[step])
        assert evals[step] != pytest.approx(eval_loss(raw, tmp_path / "e"), rel=1e-3)
    # After each evaluation the model got its own weights back: training continued from them,
    # so the weights at step 12 equal an identical run without evaluations.
    plain = Recorder()
    train(tmp_path / "plain", [plain, ptf.WeightAveragingCallback(polyak.schedules.ema(0.7))])
    for k, v in plain.steps[12].items():
        assert torch.equal(v, rec.steps[12][k]), k


def test_resume_from_checkpoint_continues_the_average(tmp_path):
    full = ptf.WeightAveragingCallback("ema_warmup")
    train(tmp_path / "full", [full])

    first = ptf.WeightAveragingCallback("ema_warmup")
    train(tmp_path / "run", [first])
    state = torch.load(tmp_path / "run" / "checkpoint-6" / ptf.STATE_FILE, weights_only=True)
    assert state["global_step"] == 6

    resumed = ptf.WeightAveragingCallback("ema_warmup")
    ckpt = str(tmp_path / "run" / "checkpoint-6")
    train(tmp_path / "run", [resumed], resume=ckpt)
    assert resumed.averager.count == full.averager.count == 12
    for k, v in full.averager.value.items():
        assert torch.equal(resumed.averager.value[k], v), k

    # A checkpoint outside the new run's output_dir is named with load_checkpoint().
    elsewhere = ptf.WeightAveragingCallback("ema_warmup")
    elsewhere.load_checkpoint(ckpt)
    train(tmp_path / "other", [elsewhere], resume=ckpt)
    for k, v in full.averager.value.items():
        assert torch.equal(elsewhere.averager.value[k], v), k


def test_resume_without_averager_state_is_refused(tmp_path):
    train(tmp_path, [], max_steps=6)
    with pytest.raises(polyak.PolyakError, match="polyak_averager.pt"):
        train(tmp_path, [ptf.WeightAveragingCallback()], resume=str(tmp_path / "checkpoint-6"))


def test_bad_arguments_are_named():
    with pytest.raises(polyak.PolyakError, match="every_n_steps"):
        ptf.WeightAveragingCallback(every_n_steps=0)
    with pytest.raises(polyak.NoOnlineFormError):
        ptf.WeightAveragingCallback(polyak.schedules.tail(2))
