"""Model-shaped safetensors checkpoints for the benchmarks, written with the official writer."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
WIDTH = 1024
LAYERS = 8


def layout(mib: int, dtype: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a small transformer of ``mib`` MiB: per layer two big matrices, a norm
    and a bias (so both big and tiny tensors are exercised)."""
    elements = mib * 2**20 // DTYPES[dtype].itemsize
    rows = max(1, (elements - 2 * LAYERS * WIDTH) // (2 * LAYERS * WIDTH))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(LAYERS):
        shapes[f"layers.{i}.attn.weight"] = (rows, WIDTH)
        shapes[f"layers.{i}.mlp.weight"] = (rows, WIDTH)
        shapes[f"layers.{i}.norm.weight"] = (WIDTH,)
        shapes[f"layers.{i}.mlp.bias"] = (WIDTH,)
    return shapes


def write_set(
    folder: str, count: int, mib: int, dtype: str, *, shard_mib: int | None = None, seed: int = 0
) -> list[str]:
    """Write ``count`` checkpoints of ``mib`` MiB each; return their paths, oldest first.

    Each tensor is ``a * p + b * q + c`` with two shared float32 noise pools ``p``, ``q`` and
    per-checkpoint, per-tensor random ``a, b, c``: cheap to make at disk speed, yet every
    checkpoint and tensor differs. With ``shard_mib``, each checkpoint is a directory of
    shards of at most that size plus ``model.safetensors.index.json``, as Hugging Face writes.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    shapes = layout(mib, dtype)
    biggest = max(int(np.prod(s)) for s in shapes.values())
    pools = [rng.standard_normal(biggest, dtype=np.float32) * np.float32(0.02) for _ in range(2)]
    out_dtype = DTYPES[dtype]
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        tensors: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            size = int(np.prod(shape))
            a, b, c = rng.standard_normal(3).astype(np.float32)
            x = pools[0][:size] * a
            x += pools[1][:size] * b
            x += c * np.float32(0.01)
            tensors[name] = x.reshape(shape).astype(out_dtype, copy=False)
        if shard_mib is None:
            path = os.path.join(folder, f"ckpt_{i:03d}.safetensors")
            save_file(tensors, path)
        else:
            path = os.path.join(folder, f"ckpt_{i:03d}")
            _save_sharded(tensors, path, shard_mib << 20)
        paths.append(path)
    return paths


def _save_sharded(tensors: dict[str, np.ndarray], folder: str, max_bytes: int) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    os.makedirs(folder, exist_ok=True)
    weight_map: dict[str, Any] = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname))
        weight_map.update(dict.fromkeys(shard, fname))
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def torch_copies(paths: list[str], folder: str) -> list[str]:
    """The same checkpoints as ``torch.save`` zip files (``.pt``), written by torch itself;
    one is loaded at a time."""
    import torch
    from safetensors.torch import load_file

    os.makedirs(folder, exist_ok=True)
    out = []
    for p in paths:
        dest = os.path.join(folder, os.path.basename(p).replace(".safetensors", ".pt"))
        torch.save(load_file(p), dest)
        out.append(dest)
    return out
