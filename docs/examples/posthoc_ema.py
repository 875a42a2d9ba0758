"""Post-hoc EMA: choose the EMA length after training (Karras et al., 2024).

Noisy SGD on a linear regression problem: with a constant learning rate the iterates keep
bouncing around the optimum, so an average helps, but an average that reaches too far back
still remembers the poor early weights. During training, two power-function EMAs
(sigma_rel 0.05 and 0.10) are tracked with ``polyak.Averager`` and saved every 50 steps to
one ``polyak.SnapshotDir`` each. After training, ``polyak.posthoc.reconstruct`` builds the
EMA of any other length from those snapshots, several lengths in one pass over the files;
a sweep then picks the best one by validation loss. One length (0.08) is also tracked
directly, to measure the reconstruction error.

The plot shows the averaging profile of the target sigma_rel=0.08 against the one the
snapshots reconstruct, and the validation loss against sigma_rel.

Run: ``python docs/examples/posthoc_ema.py --output posthoc_ema.png``
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import polyak
from polyak import posthoc
from polyak.schedules import power

SAVED = (0.05, 0.10)  # the EMAs kept during training
CHECK = 0.08  # tracked directly too, to compare with its reconstruction
SWEEP = (0.02, 0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25)


def make_problem(rng: np.random.Generator, dim: int = 200, n: int = 4000):
    w_true = rng.normal(size=dim).astype(np.float32)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = x @ w_true + rng.normal(scale=2.0, size=n).astype(np.float32)
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def loss(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    r = x.astype(np.float64) @ params["w"].astype(np.float64) + float(params["b"][0]) - y
    return float(np.mean(r**2))


def train(root: str, *, steps: int, every: int, lr: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x, y, x_val, y_val = make_problem(rng)
    params = {"w": np.zeros(x.shape[1], np.float32), "b": np.zeros(1, np.float32)}
    tracked = {s: polyak.Averager(power(sigma_rel=s)) for s in (*SAVED, CHECK)}
    dirs = {s: polyak.SnapshotDir(os.path.join(root, f"sigma-{s}")) for s in SAVED}
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(y), size=8)
        residual = x[idx] @ params["w"] + params["b"][0] - y[idx]
        params["w"] -= lr * (x[idx].T @ residual) / len(idx)
        params["b"] -= lr * residual.mean(keepdims=True)
        for avg in tracked.values():
            avg.update(params)
        if step % every == 0:
            for s, d in dirs.items():
                posthoc.save_snapshot(d, tracked[s], step)
    return {
        "final": params,
        "tracked": {s: avg.value for s, avg in tracked.items()},
        "val": (x_val, y_val),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", default="posthoc_ema.png", help="where to save the plot")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50, help="save the EMAs every N steps")
    parser.add_argument("--lr", type=float, default=0.004, help="SGD learning rate")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as root:
        run = train(os.path.join(root, "snaps"), steps=args.steps, every=args.every, lr=args.lr)
        outs = [os.path.join(root, f"ema-{s}.safetensors") for s in SWEEP]
        coef = posthoc.reconstruct(os.path.join(root, "snaps"), outs, sigma_rel=list(SWEEP))
        from polyak import safetensors as st

        recon = {s: st.load(out) for s, out in zip(SWEEP, outs, strict=True)}
        found = posthoc.find_snapshots(os.path.join(root, "snaps"))

    x_val, y_val = run["val"]
    tracked = run["tracked"]

    def vec(tree: dict) -> np.ndarray:
        return np.concatenate([tree["w"], tree["b"]]).astype(np.float64)

    err = np.linalg.norm(vec(recon[CHECK]) - vec(tracked[CHECK]))
    spread = np.linalg.norm(vec(tracked[0.05]) - vec(tracked[0.10]))
    val = {s: loss(recon[s], x_val, y_val) for s in SWEEP}
    best = min(val, key=val.get)
    print(
        f"{len(found)} snapshots; sigma_rel={CHECK} reconstructed vs tracked: "
        f"|diff| = {err:.3g}, |ema(0.05) - ema(0.10)| = {spread:.3g}, ratio {err / spread:.2e}"
    )
    print(f"validation loss of the last iterate: {loss(run['final'], x_val, y_val):.4f}")
    for s in SWEEP:
        mark = "  <- best" if s == best else ""
        print(f"  post-hoc EMA sigma_rel={s:<5}: validation loss {val[s]:.4f}{mark}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t_end = max(t for _, t, _ in found)
    tau = np.linspace(0.0, t_end, 1001)
    k = SWEEP.index(CHECK)
    target = posthoc.profile(t_end, polyak.schedules.sigma_rel_to_gamma(CHECK), tau)
    rebuilt = sum(c * posthoc.profile(t, g, tau) for c, (_, t, g) in zip(coef[:, k], found))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s, color in zip(SAVED, ("C2", "C0"), strict=True):
        g = polyak.schedules.sigma_rel_to_gamma(s)
        ax1.plot(tau, posthoc.profile(t_end, g, tau), color=color, lw=1, alpha=0.6,
                 label=f"stored, sigma_rel={s} (t={t_end:g})")  # fmt: skip
    ax1.plot(tau, target, color="k", lw=2.5, label=f"target, sigma_rel={CHECK}")
    ax1.plot(tau, rebuilt, color="C1", ls="--", lw=1.8, label="reconstructed")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("weight in the average")
    ax1.set_xlim(0.4 * t_end, t_end * 1.02)
    ax1.set_title("Averaging profiles")
    ax1.legend(fontsize="small", loc="upper left")
    ax2.plot(SWEEP, [val[s] for s in SWEEP], "o-", color="C0", label="post-hoc EMA")
    ax2.axhline(loss(run["final"], x_val, y_val), color="C3", ls="--", label="last iterate")
    ax2.plot([CHECK], [loss(tracked[CHECK], x_val, y_val)], "x", color="k", ms=9,
             label=f"tracked directly ({CHECK})")  # fmt: skip
    ax2.set_xlabel("sigma_rel")
    ax2.set_ylabel("validation MSE")
    ax2.set_title("Choosing the EMA length after training")
    ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    plt.close(fig)
    print("plot saved to", args.output)
    return {"relative_error": err / spread, "val": val, "best": best, "coef": coef}


if __name__ == "__main__":
    main()
