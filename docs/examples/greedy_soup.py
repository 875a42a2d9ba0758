"""Greedy model soup on a small MLP fine-tuned several ways (scikit-learn's digits).

A two-layer MLP is pre-trained briefly, then fine-tuned eight times from that start with
different learning rates, weight decays, data orders and 60% subsets of the training set;
one run uses a learning rate far too high and diverges. ``polyak.soup.greedy`` picks which
fine-tuned weights to average by held-out accuracy; the plot shows the soup's accuracy as
candidates are tried.

Run: ``python docs/examples/greedy_soup.py --output greedy_soup.png``
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import polyak
from polyak import soup


def init_mlp(rng: np.random.Generator, n_in: int, n_hidden: int, n_out: int) -> dict:
    return {
        "hidden": {
            "kernel": (rng.normal(size=(n_in, n_hidden)) / np.sqrt(n_in)).astype(np.float32),
            "bias": np.zeros(n_hidden, np.float32),
        },
        "out": {
            "kernel": (rng.normal(size=(n_hidden, n_out)) / np.sqrt(n_hidden)).astype(np.float32),
            "bias": np.zeros(n_out, np.float32),
        },
    }


def forward(params: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(x @ params["hidden"]["kernel"] + params["hidden"]["bias"], 0.0)
    return h, h @ params["out"]["kernel"] + params["out"]["bias"]


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    with np.errstate(all="ignore"):  # a diverged model may overflow: it just scores badly
        _, logits = forward(params, x)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def train(params, x, y, *, lr, steps, seed, weight_decay=0.0, batch=64) -> dict:
    """Plain minibatch SGD on the cross-entropy, in float32."""
    rng = np.random.default_rng(seed)
    p = {k: {n: a.copy() for n, a in v.items()} for k, v in params.items()}
    with np.errstate(all="ignore"):
        for _ in range(steps):
            idx = rng.integers(0, len(y), size=batch)
            xb, yb = x[idx], y[idx]
            h, logits = forward(p, xb)
            logits = logits - logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(batch), yb] -= 1.0
            d_out = prob / batch
            grads = {
                "out": {"kernel": h.T @ d_out, "bias": d_out.sum(axis=0)},
            }
            d_h = (d_out @ p["out"]["kernel"].T) * (h > 0)
            grads["hidden"] = {"kernel": xb.T @ d_h, "bias": d_h.sum(axis=0)}
            for layer in p:
                for name in p[layer]:
                    g = grads[layer][name] + weight_decay * p[layer][name]
                    p[layer][name] = (p[layer][name] - lr * g).astype(np.float32)
    return p


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", default="greedy_soup.png", help="where to save the plot")
    args = parser.parse_args(argv)

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(
        x, digits.target, test_size=0.5, random_state=0, stratify=digits.target
    )
    start = train(
        init_mlp(np.random.default_rng(0), 64, 128, 10),
        x_train,
        y_train,
        lr=0.1,
        steps=300,
        seed=0,
    )
    # (learning rate, weight decay) of each fine-tuning run; the lr=1e3 run diverges.
    settings = [(0.05, 0), (0.2, 1e-3), (1e3, 0), (0.1, 1e-4), (0.3, 0), (0.15, 1e-3),
                (0.1, 0), (0.25, 1e-4)]  # fmt: skip
    candidates = []
    for seed, (lr, wd) in enumerate(settings):
        subset = np.random.default_rng(100 + seed).random(len(y_train)) < 0.6
        candidates.append(
            train(
                start,
                x_train[subset],
                y_train[subset],
                lr=lr,
                steps=300,
                seed=seed,
                weight_decay=wd,
            )
        )

    def evaluate(params: dict) -> float:
        return accuracy(params, x_val, y_val)

    result = soup.greedy(candidates, evaluate)
    uniform = evaluate(polyak.average(candidates))
    best = max(result.individual_scores)
    print("individual accuracies:", [round(s, 4) for s in result.individual_scores])
    print("greedy soup members:  ", result.members)
    print("soup after each step: ", [round(s, 4) for s in result.scores])
    print(
        f"best single {best:.4f}, greedy soup {result.scores[-1]:.4f}, uniform soup {uniform:.4f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(candidates)), key=lambda i: -result.individual_scores[i])
    steps = np.arange(1, len(order) + 1)
    alone = np.array([result.individual_scores[i] for i in order])
    # Zoom on the good candidates; what falls below (the diverged run, the uniform soup) is
    # drawn as a marker on the bottom edge with its value written next to it.
    bottom = min(v for v in alone if v > 0.5 * best) - 0.01
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    shown = alone >= bottom
    ax.plot(steps[shown], alone[shown], "o", color="0.6", label="candidate alone")
    for k in np.flatnonzero(~shown):
        ax.plot(steps[k], bottom + 0.001, "v", color="0.6")
        ax.annotate(
            f"{alone[k]:.3f}",
            (steps[k], bottom + 0.001),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize="small",
            color="0.4",
        )
    ax.plot(steps, result.scores, "-", color="C0", label="greedy soup")
    joined = [k for k, i in enumerate(order) if i in result.members]
    left_out = [k for k, i in enumerate(order) if i not in result.members]
    ax.plot(steps[joined], np.array(result.scores)[joined], "o", color="C0", label="joined")
    ax.plot(
        steps[left_out], np.array(result.scores)[left_out], "x", color="C3", ms=9, label="left out"
    )
    ax.set_ylim(bottom, max(result.scores) + 0.005)
    ax.text(
        0.6,
        0.04,
        f"uniform soup of all {len(order)}: {uniform:.3f}",
        transform=ax.transAxes,
        ha="center",
        color="C3",
    )
    ax.set_xticks(steps, [f"#{i}" for i in order])
    ax.set_xlabel("candidate tried (best alone first)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Greedy soup on digits: a diverged run stays out")
    ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print("plot saved to", args.output)
    return {"result": result, "uniform": uniform, "best_single": best}


if __name__ == "__main__":
    main()
