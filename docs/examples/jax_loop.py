"""A power-function EMA (Karras et al., 2024) of a JAX MLP's parameters.

A small MLP fits a noisy 1-D function with SGD, its parameters a plain dict pytree updated
by ``jax.grad``. ``polyak.Averager`` keeps a power EMA of them (``sigma_rel=0.05``, whose
decay ``(1 - 1/t) ** (gamma + 1)`` forgets early iterates as the run grows). JAX arrays are
immutable, so each update returns new arrays on the parameters' device.

Reference: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models" (https://arxiv.org/abs/2312.02696), 2024.

Run:  python docs/examples/jax_loop.py --steps 4000
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import polyak


def init_params(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, dict[str, jax.Array]]:
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "w": jax.random.normal(sub, (m, n)) / jnp.sqrt(m),
            "b": jnp.zeros(n),
        }
    return params


def forward(params: dict, x: jax.Array) -> jax.Array:
    *hidden, last = sorted(params)
    for name in hidden:
        x = jnp.tanh(x @ params[name]["w"] + params[name]["b"])
    return x @ params[last]["w"] + params[last]["b"]


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((forward(params, x) - y) ** 2)


@jax.jit
def sgd_step(params: dict, x: jax.Array, y: jax.Array, lr: float) -> dict:
    grads = jax.grad(loss_fn)(params, x, y)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="SGD steps (default 4000)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x_train = rng.uniform(-3, 3, size=(2000, 1)).astype(np.float32)
    y_train = np.sin(2 * x_train) + 0.3 * rng.normal(size=x_train.shape).astype(np.float32)
    x_test = np.linspace(-3, 3, 500, dtype=np.float32)[:, None]
    y_test = np.sin(2 * x_test)

    params = init_params(jax.random.PRNGKey(args.seed), (1, 64, 64, 1))
    averager = polyak.Averager(polyak.schedules.power(sigma_rel=0.05))
    for _ in range(args.steps):
        i = rng.integers(len(x_train), size=32)
        params = sgd_step(params, x_train[i], y_train[i], args.lr)
        averager.update(params)

    ema = averager.value
    assert isinstance(ema["layer0"]["w"], jax.Array)  # still JAX arrays, on the same device
    last = float(loss_fn(params, x_test, y_test))
    averaged = float(loss_fn(ema, x_test, y_test))
    print(f"steps: {args.steps}, snapshots averaged: {averager.count}")
    print(f"last parameters:  test MSE against the clean function {last:.5f}")
    print(f"power-EMA params: test MSE against the clean function {averaged:.5f}")
    return {"last": last, "averaged": averaged}


if __name__ == "__main__":
    main()
