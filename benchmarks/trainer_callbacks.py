"""What the trainer callbacks cost per training step, against the same loop without them.

Each trainer runs the same model, data and number of steps with and without the callback,
interleaved (``--repeats`` rounds of every variant) so that a noisy machine affects all
variants alike. A timing callback, registered last, records the time at the end of every
optimizer step; the per-step time of a run is the median of the differences (the first
``--warmup`` steps dropped), so trainer start-up is not counted.

- Lightning: an MLP (``--width``, 4 layers) on random regression data; variants: no
  averaging, ``polyak.lightning.WeightAveraging(ema(0.999))``, and Lightning's own
  ``EMAWeightAveraging`` (torch ``AveragedModel``) for reference.
- Hugging Face Trainer: a GPT-2 built from a config (``--gpt2-layers``, ``--gpt2-width``);
  variants: no callback, ``polyak.transformers.WeightAveragingCallback(ema(0.999))``.

Run: ``python benchmarks/trainer_callbacks.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _step_times(stamps: list[float], warmup: int) -> float:
    deltas = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return statistics.median(deltas)


# --- Lightning ------------------------------------------------------------------------------


def lightning_run(variant: str, args: argparse.Namespace) -> float:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging

    import polyak.lightning

    width = args.width

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers = [torch.nn.Linear(32, width), torch.nn.ReLU()]
            for _ in range(2):
                layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Stamps(pl.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, *a, **k) -> None:
            self.t.append(time.perf_counter())

    callbacks: list = {
        "no averaging": [],
        "polyak WeightAveraging": [polyak.lightning.WeightAveraging(polyak.schedules.ema(0.999))],
        "Lightning EMAWeightAveraging": [EMAWeightAveraging(decay=0.999)],
    }[variant]
    stamps = Stamps()
    torch.manual_seed(0)
    x, y = torch.randn(args.steps * 64, 32), torch.randn(args.steps * 64, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            max_steps=args.steps, accelerator="cpu", devices=1, callbacks=[*callbacks, stamps],
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=root,
        )  # fmt: skip
        trainer.fit(MLP(), loader)
    return _step_times(stamps.t, args.warmup)


# --- Hugging Face Trainer -------------------------------------------------------------------


def transformers_run(variant: str, args: argparse.Namespace) -> float:
    import transformers

    import polyak.transformers

    class Stamps(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_step_end(self, *a, **k) -> None:
            self.t.append(time.perf_counter())

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=args.gpt2_layers, n_embd=args.gpt2_width, n_head=4, vocab_size=512, n_positions=64
    )
    ids = torch.randint(0, 512, (args.steps * 8, 64))
    data = [{"input_ids": row, "labels": row} for row in ids]
    callbacks = {
        "no callback": [],
        "polyak WeightAveragingCallback": [
            polyak.transformers.WeightAveragingCallback(polyak.schedules.ema(0.999))
        ],
    }[variant]
    stamps = Stamps()
    with tempfile.TemporaryDirectory() as out:
        targs = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            logging_strategy="no",
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=transformers.GPT2LMHeadModel(config), args=targs, train_dataset=data,
            callbacks=[*callbacks, stamps],
        )  # fmt: skip
        trainer.train()
    return _step_times(stamps.t, args.warmup)


def table(name: str, runs: dict[str, list[float]], base: str) -> str:
    ref = statistics.median(runs[base])
    lines = [f"{name}", f"  {'variant':<32} {'ms/step':>9} {'overhead':>10}"]
    for variant, times in runs.items():
        t = statistics.median(times)
        extra = "" if variant == base else f"{(t - ref) * 1e3:+7.3f} ms ({(t / ref - 1):+.1%})"
        lines.append(f"  {variant:<32} {t * 1e3:9.3f} {extra:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--width", type=int, default=512, help="Lightning MLP width")
    parser.add_argument("--gpt2-layers", type=int, default=2)
    parser.add_argument("--gpt2-width", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: does it run?")
    parser.add_argument("--only", choices=["lightning", "transformers"], default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.width = 20, 2, 1, 64
        args.gpt2_layers, args.gpt2_width = 1, 32
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.steps} steps")
    suites = {
        "lightning": (
            lightning_run,
            ["no averaging", "polyak WeightAveraging", "Lightning EMAWeightAveraging"],
        ),  # fmt: skip
        "transformers": (transformers_run, ["no callback", "polyak WeightAveragingCallback"]),
    }
    for name, (run, variants) in suites.items():
        if args.only not in (None, name):
            continue
        runs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                runs[v].append(run(v, args))
        print(table(name, runs, variants[0]))


if __name__ == "__main__":
    main()
