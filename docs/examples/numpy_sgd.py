"""Polyak-Ruppert averaging of plain SGD on a noisy least-squares problem, in numpy.

With a constant step size, SGD's last iterate keeps bouncing around the optimum; the average
of the iterates settles much closer to it (Polyak & Juditsky, "Acceleration of Stochastic
Approximation by Averaging", 1992). ``polyak.Averager`` keeps that average as the loop runs,
updating its buffers in place.

Run:  python docs/examples/numpy_sgd.py --steps 2000
"""

from __future__ import annotations

import argparse

import numpy as np

import polyak


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps (default 2000)")
    parser.add_argument("--lr", type=float, default=0.05, help="constant step size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    n, d = 2000, 20
    x = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    y = x @ w_true + 0.5 * rng.normal(size=n)
    xb = np.hstack([x, np.ones((n, 1))])
    opt = np.linalg.lstsq(xb, y, rcond=None)[0]
    optimum = {"w": opt[:d], "b": opt[d]}

    def loss(p: dict[str, np.ndarray]) -> float:
        return float(np.mean((x @ p["w"] + p["b"] - y) ** 2))

    def distance(p: dict[str, np.ndarray]) -> float:
        return float(np.hypot(np.linalg.norm(p["w"] - optimum["w"]), p["b"] - optimum["b"]))

    params = {"w": np.zeros(d), "b": np.zeros(())}
    # SWA-style: skip the first 10% of the run (the transient), average the rest equally.
    averager = polyak.Averager(polyak.schedules.swa(start=args.steps // 10))
    for _ in range(args.steps):
        i = rng.integers(n, size=8)  # a minibatch of 8
        err = x[i] @ params["w"] + params["b"] - y[i]
        params["w"] -= args.lr * (x[i].T @ err) / len(i)
        params["b"] -= args.lr * err.mean()
        averager.update(params)

    avg = averager.value
    result = {
        "optimum": loss(optimum),
        "last": loss(params),
        "averaged": loss(avg),
        "last_distance": distance(params),
        "averaged_distance": distance(avg),
    }
    print(f"snapshots averaged: {averager.count}")
    print(f"loss at the least-squares optimum: {result['optimum']:.5f}")
    print(
        f"last iterate:     loss {result['last']:.5f}, distance to optimum "
        f"{result['last_distance']:.4f}"
    )
    print(
        f"averaged iterate: loss {result['averaged']:.5f}, distance to optimum "
        f"{result['averaged_distance']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
