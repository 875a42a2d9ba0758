"""Cost of ``polyak.Averager.update`` against a plain copy of the same bytes.

An online update is memory-bound: it must read the snapshot and read and write the average,
so it cannot beat ``np.copyto`` of the same tree (one read, one write) by much, and should
not cost much more. This measures both in the same run, interleaved, on a model-shaped
float32 tree (GPT-2-small blocks, 256 MB by default) and reports the ratio; the target is
<= 2x. The average is checked against a float64 reference after timing.

Run:  python benchmarks/online.py [--mb 256] [--repeats 7] [--dtype float32] [--torch]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

import polyak

# One GPT-2-small transformer block (d_model 768): name -> shape.
_BLOCK = {
    "ln_1.weight": (768,),
    "ln_1.bias": (768,),
    "attn.c_attn.weight": (768, 2304),
    "attn.c_attn.bias": (2304,),
    "attn.c_proj.weight": (768, 768),
    "attn.c_proj.bias": (768,),
    "ln_2.weight": (768,),
    "ln_2.bias": (768,),
    "mlp.c_fc.weight": (768, 3072),
    "mlp.c_fc.bias": (3072,),
    "mlp.c_proj.weight": (3072, 768),
    "mlp.c_proj.bias": (768,),
}


def model_tree(megabytes: float, dtype: np.dtype, rng: np.random.Generator) -> dict:
    """GPT-2-small-shaped blocks until the tree holds ``megabytes`` MB (10**6 bytes)."""
    target = int(megabytes * 1e6)
    tree, size, i = {}, 0, 0
    while size < target:
        block = {}
        for name, shape in _BLOCK.items():
            n = int(np.prod(shape)) * dtype.itemsize
            if size + n > target and block:
                shape = (max(1, (target - size) // dtype.itemsize),)
            block[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            size += block[name].nbytes
            if size >= target:
                break
        tree[f"h.{i}"] = block
        i += 1
    return tree


def nbytes(tree: dict) -> int:
    return sum(leaf.nbytes for block in tree.values() for leaf in block.values())


def copy_tree(src: dict, dst: dict) -> None:
    for name, block in src.items():
        for key, leaf in block.items():
            np.copyto(dst[name][key], leaf)


def bench_numpy(args: argparse.Namespace) -> float:
    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    a = model_tree(args.mb, dtype, rng)
    b = {
        k: {n: (x.astype(np.float32) + 1).astype(dtype) for n, x in v.items()}
        for k, v in a.items()
    }
    dst = {k: {n: np.empty_like(x) for n, x in v.items()} for k, v in a.items()}
    size = nbytes(a)
    leaves = sum(len(v) for v in a.values())
    print(f"numpy {args.dtype} tree: {size / 1e6:.1f} MB in {leaves} leaves")

    averager = polyak.Averager(polyak.schedules.ema(0.9))
    averager.update(a)  # the first update allocates the average
    averager.update(b)  # the second the scratch buffers
    copy_tree(a, dst)
    updates, copies = [], []
    snapshots = [a, b]
    for r in range(args.repeats):
        t0 = time.perf_counter()
        copy_tree(snapshots[r % 2], dst)
        t1 = time.perf_counter()
        averager.update(snapshots[r % 2])
        t2 = time.perf_counter()
        copies.append(t1 - t0)
        updates.append(t2 - t1)
    t_copy, t_update = statistics.median(copies), statistics.median(updates)
    ratio = t_update / t_copy
    print(
        f"  np.copyto: {t_copy * 1e3:8.1f} ms  ({size / t_copy / 1e9:5.2f} GB/s)\n"
        f"  update:    {t_update * 1e3:8.1f} ms  ({size / t_update / 1e9:5.2f} GB/s of snapshot)\n"
        f"  update / copy = {ratio:.2f}  (target <= 2.00, median of {args.repeats})"
    )

    # Correctness after timing: the EMA of the alternating snapshots, in float64.
    n = averager.count
    seq = [a, b] + [snapshots[r % 2] for r in range(args.repeats)]
    w = polyak.schedules.ema(0.9).weights(n)
    wa = sum(wi for wi, s in zip(w, seq) if s is a)
    name, key = "h.0", "attn.c_attn.weight"
    ref = wa * a[name][key].astype(np.float64) + (1 - wa) * b[name][key].astype(np.float64)
    got = averager.value[name][key].astype(np.float64)
    tol = 4 * float(np.finfo(dtype).eps) if dtype.kind == "f" else 2.0**-7
    err = float(np.max(np.abs(got - ref) / np.maximum(1.0, np.abs(ref))))
    assert err <= tol, f"average is off by {err} (tolerance {tol})"
    print(f"  checked against a float64 reference: max relative error {err:.1e}")
    return ratio


def bench_torch(args: argparse.Namespace) -> float:
    import torch

    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    float32_mb = args.mb * 4 / torch.empty((), dtype=dtype).element_size()
    a = {
        k: {n: torch.from_numpy(x).to(device=device, dtype=dtype) for n, x in v.items()}
        for k, v in model_tree(float32_mb, np.dtype(np.float32), rng).items()
    }
    b = {k: {n: x + 1 for n, x in v.items()} for k, v in a.items()}
    dst = {k: {n: torch.empty_like(x) for n, x in v.items()} for k, v in a.items()}
    size = sum(x.numel() * x.element_size() for v in a.values() for x in v.values())
    print(f"torch {args.dtype} tree on {device}: {size / 1e6:.1f} MB")

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    averager = polyak.Averager(polyak.schedules.ema(0.9))
    averager.update(a)
    averager.update(b)
    updates, copies = [], []
    for r in range(args.repeats):
        src = a if r % 2 == 0 else b
        sync()
        t0 = time.perf_counter()
        for k, v in src.items():
            for n, x in v.items():
                dst[k][n].copy_(x)
        sync()
        t1 = time.perf_counter()
        averager.update(src)
        sync()
        t2 = time.perf_counter()
        copies.append(t1 - t0)
        updates.append(t2 - t1)
    t_copy, t_update = statistics.median(copies), statistics.median(updates)
    ratio = t_update / t_copy
    print(
        f"  Tensor.copy_: {t_copy * 1e3:8.1f} ms\n"
        f"  update:       {t_update * 1e3:8.1f} ms\n"
        f"  update / copy = {ratio:.2f}"
    )
    return ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=256.0, help="tree size in MB (default 256)")
    parser.add_argument("--repeats", type=int, default=7, help="timed updates (default 7)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"]
    )
    parser.add_argument("--torch", action="store_true", help="also time torch tensors")
    args = parser.parse_args(argv)
    bench_numpy(args)
    if args.torch:
        bench_torch(args)


if __name__ == "__main__":
    main()
