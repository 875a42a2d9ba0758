"""An EMA of a PyTorch model's weights, kept by ``polyak.Averager`` over ``state_dict()``.

A small MLP learns a noisy two-spirals problem with SGD. After every step the averager folds
the model's ``state_dict()`` (parameters and BatchNorm buffers; the int counter
``num_batches_tracked`` takes the newest value) into a warmed-up EMA, in place on the
model's device. At the end the average is loaded back with ``load_state_dict`` into a copy
of the model and both are evaluated on held-out data. Midway, the averager is saved and
resumed from the file, as a restarted job would.

Run:  python docs/examples/torch_loop.py --steps 3000
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile

import torch

import polyak


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 5
    x += 0.1 * torch.randn(n, 2, generator=generator)
    return x, label


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps (default 3000)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x_train, y_train = spirals(4000, gen)
    x_test, y_test = spirals(2000, gen)
    x_train, y_train = x_train.to(args.device), y_train.to(args.device)
    x_test, y_test = x_test.to(args.device), y_test.to(args.device)

    model = torch.nn.Sequential(
        torch.nn.Linear(2, 64),
        torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 2),
    ).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    averager = polyak.Averager(polyak.schedules.ema_warmup(decay=0.995, power=0.75))

    with tempfile.TemporaryDirectory() as tmp:
        for step in range(args.steps):
            model.train()
            i = torch.randint(0, len(x_train), (64,), generator=gen).to(args.device)
            loss = torch.nn.functional.cross_entropy(model(x_train[i]), y_train[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            averager.update(model.state_dict())  # in place, on the model's device
            if step == args.steps // 2:
                # What a restarted job does: save, then resume from the file. The resumed
                # average continues bit for bit as if nothing had happened.
                path = os.path.join(tmp, "ema.safetensors")
                averager.save(path)
                averager = polyak.Averager.load(path, like=model.state_dict())

    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(averager.value)
    last_loss, last_acc = evaluate(model, x_test, y_test)
    ema_loss, ema_acc = evaluate(ema_model, x_test, y_test)
    print(f"steps: {args.steps}, snapshots averaged: {averager.count}, device: {args.device}")
    print(f"last weights: test loss {last_loss:.4f}, accuracy {last_acc:.3f}")
    print(f"EMA weights:  test loss {ema_loss:.4f}, accuracy {ema_acc:.3f}")
    return {"last_loss": last_loss, "ema_loss": ema_loss, "last_acc": last_acc, "ema_acc": ema_acc}


if __name__ == "__main__":
    main()
