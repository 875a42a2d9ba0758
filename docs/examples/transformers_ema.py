"""Hugging Face Trainer: an EMA of a small GPT-2's weights, evaluated, saved and reloaded.

The model is built from a config (no download) and learns to continue counting sequences.
The callback folds the weights after every optimizer step; the Trainer's evaluations run with
the average; each ``checkpoint-N/`` gets an ``average/`` model folder and the end of training
writes ``<output_dir>/average/``, which loads with ``from_pretrained``.

Run: ``python docs/examples/transformers_ema.py``
"""

from __future__ import annotations

import tempfile

import torch
import transformers

import polyak
import polyak.transformers


class Counting(torch.utils.data.Dataset):
    """Sequences that count up from a random start, modulo the vocabulary size."""

    def __init__(self, seed: int, n: int, length: int = 16, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ema = polyak.transformers.WeightAveragingCallback(polyak.schedules.ema_warmup(decay=0.95))
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=40, per_device_train_batch_size=8, learning_rate=3e-3,
            eval_strategy="steps", eval_steps=20, save_steps=20,
            report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=Counting(0, 256),
            eval_dataset=Counting(1, 64), callbacks=[ema],
        )  # fmt: skip
        trainer.train()
        evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
        print("eval loss of the average during training:", [round(v, 4) for v in evals])

        with ema.averager.applied():  # an evaluate() of your own: swap the average in
            from_average = trainer.evaluate()["eval_loss"]
        own = trainer.evaluate()["eval_loss"]  # the model's own (last) weights
        print(f"eval loss after training: average {from_average:.4f}, last weights {own:.4f}")

        reloaded = transformers.GPT2LMHeadModel.from_pretrained(f"{out}/average")
        with torch.no_grad():
            for name, value in reloaded.state_dict().items():
                assert torch.equal(value, ema.averager.value[name]), name
        print(f"{out}/average/ reloads with from_pretrained and holds the average")
    assert from_average == evals[-1]


if __name__ == "__main__":
    main()
