"""In-memory averaging: ``polyak.average`` against the stacked ``np.average`` recipe.

Each method runs in its own subprocess, which builds the same snapshots (N trees of SIZE
MiB of float32, model-shaped leaves), times the average, checks it against a float64
reference, and reports the peak RSS during the average (Linux VmHWM, reset just before)
minus the RSS before it: the memory the averaging itself added, output included.

    python benchmarks/average.py            # 10 snapshots of a 100 MiB tree
    python benchmarks/average.py --n 10 --mib 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

METHODS = ("polyak", "np_average_stacked")


def make_snapshots(n: int, mib: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """N trees shaped like a small transformer: a few big matrices, biases, norms."""
    rng = np.random.default_rng(seed)
    elements = mib * 2**20 // 4
    width = 1024
    rows = max(1, elements // (8 * width))
    layout = {
        f"layer{i}.{k}": shape
        for i in range(4)
        for k, shape in (
            ("attn.weight", (rows, width)),
            ("mlp.weight", (rows, width)),
            ("norm.weight", (width,)),
            ("mlp.bias", (width,)),
        )
    }
    return [
        {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in layout.items()}
        for _ in range(n)
    ]


def reset_peak_rss() -> None:
    """Start the peak-RSS count afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_one(method: str, n: int, mib: int) -> dict:
    import polyak

    snaps = make_snapshots(n, mib)
    w = polyak.weights("linear", n)
    before = current_rss_mib()
    reset_peak_rss()
    start = time.perf_counter()
    if method == "polyak":
        out = polyak.average(snaps, "linear")
    else:
        # The tutorial recipe: stack every snapshot's layer, then np.average over axis 0.
        out = {
            k: np.average(np.array([s[k] for s in snaps]), axis=0, weights=w).astype(np.float32)
            for k in snaps[0]
        }
    seconds = time.perf_counter() - start
    peak_added = peak_rss_mib() - before
    err = 0.0
    for k in snaps[0]:
        ref = sum(wi * s[k].astype(np.float64) for wi, s in zip(w, snaps))
        err = max(err, float(np.abs(out[k] - ref).max()))
    total = sum(a.nbytes for s in snaps for a in s.values())
    return {
        "method": method,
        "n": n,
        "mib": mib,
        "seconds": seconds,
        "gb_per_s": total / seconds / 1e9,
        "peak_rss_added_mib": peak_added,
        "inputs_mib": total / 2**20,
        "max_abs_err": err,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--mib", type=int, default=100, help="size of one snapshot")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.n, args.mib)))
        return []
    results = []
    for method in METHODS:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                method,
                "--n",
                str(args.n),
                "--mib",
                str(args.mib),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'method':<20} {'seconds':>8} {'GB/s':>6} {'peak RSS added':>15} {'max err':>9}")
    for r in results:
        print(
            f"{r['method']:<20} {r['seconds']:8.2f} {r['gb_per_s']:6.2f} "
            f"{r['peak_rss_added_mib']:11.0f} MiB {r['max_abs_err']:9.1e}"
        )
    print(
        f"(N={args.n} snapshots of {args.mib} MiB float32, linear weights; inputs "
        f"{results[0]['inputs_mib']:.0f} MiB held by both)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
