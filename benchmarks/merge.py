"""Benchmark: streaming merge of N safetensors checkpoints against the disk's warm read speed.

For each dtype it generates N model-shaped checkpoints of --size-mib each, then in the same
run measures

* the warm read throughput of those files (a warm-up pass, then large ``readinto`` calls
  into one reused buffer, best of --repeat): the ceiling any merge can reach;
* ``polyak.safetensors.merge`` of the N files in a fresh subprocess (best of --repeat), as
  GB/s of input bytes and as a fraction of the read throughput, fsync included;
* the merge's peak RSS measured from outside: ``os.wait4`` on the subprocess gives its
  ``ru_maxrss`` (this parent imports no numpy and stays small, so a child's figure is its own).

After timing, every tensor of the result is spot-checked against a float64 reference read from
the inputs. Targets (issue 3): >= 60% of the warm read throughput, peak RSS < 256 MiB, for
float32 and bfloat16. Generated files are deleted at the end; a JSON summary is written.

    python benchmarks/merge.py                       # 8 x 512 MiB, float32 and bfloat16
    python benchmarks/merge.py --size-mib 64 -n 4    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READ_BUFFER = 16 << 20

GENERATE = """
import sys, numpy as np, ml_dtypes
sys.path.insert(0, {root!r})
import polyak.safetensors as pst
dtype = np.dtype(ml_dtypes.bfloat16 if {dtype!r} == "bfloat16" else {dtype!r})
budget = {size_mib} * 2**20 // dtype.itemsize  # elements per checkpoint
d = 1024
shapes = [("embed.weight", (8192, d))]
i = 0
while sum(int(np.prod(s)) for _, s in shapes) < budget:
    for name, shape in [("attn.qkv.weight", (d, 3 * d)), ("attn.out.weight", (d, d)),
                        ("mlp.up.weight", (d, 4 * d)), ("mlp.down.weight", (4 * d, d)),
                        ("norm.weight", (d,)), ("mlp.up.bias", (4 * d,))]:
        shapes.append((f"layers.{{i}}.{{name}}", shape))
    i += 1
rng = np.random.default_rng(0)
for k in range({n}):
    tree = {{name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
             for name, shape in shapes}}
    tree["step"] = np.array(1000 * (k + 1), np.int64)
    pst.save(tree, {folder!r} + f"/step_{{1000 * (k + 1)}}.safetensors", {{"format": "pt"}})
    del tree
"""

MERGE = """
import json, sys
sys.path.insert(0, {root!r})
import polyak.safetensors as pst
r = pst.merge({inputs!r}, {output!r}, {schedule!r}, threads={threads!r})
print(json.dumps({{"seconds": r.seconds, "bytes_read": r.bytes_read,
                  "bytes_written": r.bytes_written, "threads": r.threads}}))
"""

CHECK = """
import sys, numpy as np
sys.path.insert(0, {root!r})
import polyak, polyak.safetensors as pst
inputs, output = {inputs!r}, {output!r}
w = polyak.weights({schedule!r}, len(inputs))
cks = [pst.Checkpoint(p) for p in inputs]
out = pst.Checkpoint(output)
worst = 0.0
for name in out.keys():
    dtype, shape = out.info(name)
    size = int(np.prod(shape))
    start, m = size // 3, min(size, 65536)
    m = min(m, size - start)
    got = np.empty(m, dtype)
    out.read(name, start, got)
    if dtype.kind in "iub":
        ref = np.empty(m, dtype)
        cks[-1].read(name, start, ref)
        assert np.array_equal(got, ref), name
        continue
    ref, scale = np.zeros(m), np.zeros(m)
    for wi, ck in zip(w, cks):
        x = np.empty(m, dtype)
        ck.read(name, start, x)
        ref += wi * x.astype(np.float64)
        scale += abs(wi) * np.abs(x.astype(np.float64))
    # one rounding to the output dtype, plus float32 accumulation error over n terms
    out_eps = 2.0**-24 if dtype == np.float32 else 2.0**-8  # half an ulp, relative
    tol = np.abs(ref) * out_eps + scale * len(inputs) * 2.0**-23 + 1e-38
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= tol), (name, float(err.max()))
    worst = max(worst, float(err.max()))
print(worst)
"""


def _python(code: str, *, capture: bool = True) -> tuple[str, int, float, float]:
    """Run code in a fresh interpreter; return (stdout, peak RSS bytes, wall s, CPU s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE if capture else None,
        stderr=None,
        text=True,
    )
    out = proc.stdout.read() if capture and proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"subprocess failed with status {proc.returncode}")
    cpu = usage.ru_utime + usage.ru_stime
    return out, usage.ru_maxrss * 1024, time.perf_counter() - t0, cpu


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_throughput(paths: list[str], repeat: int) -> tuple[float, float]:
    """Warm read throughput in bytes/s (large readinto calls into one reused buffer), and
    the CPU seconds of the best pass."""
    buf = bytearray(READ_BUFFER)
    view = memoryview(buf)

    def once() -> tuple[float, float]:
        total = 0
        t0, c0 = time.perf_counter(), _cpu()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        return total / (time.perf_counter() - t0), _cpu() - c0

    once()  # warm-up: bring every page into the page cache
    return max(once() for _ in range(repeat))


def bench_dtype(args: argparse.Namespace, dtype: str, folder: str) -> dict:
    os.makedirs(folder, exist_ok=True)
    print(f"[{dtype}] generating {args.n} x {args.size_mib} MiB in {folder} ...", flush=True)
    _python(GENERATE.format(root=ROOT, dtype=dtype, size_mib=args.size_mib, n=args.n,
                            folder=folder), capture=False)  # fmt: skip
    inputs = sorted(
        (os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("step_")),
        key=lambda p: int(os.path.basename(p)[5:].split(".")[0]),
    )
    input_bytes = sum(os.path.getsize(p) for p in inputs)
    output = os.path.join(folder, "merged.safetensors")
    load_before = os.getloadavg()[0]
    # CPU an interpreter spends importing polyak: subtracted from the merge's CPU time.
    startup_cpu = min(
        _python(f"import sys; sys.path.insert(0, {ROOT!r}); import polyak.safetensors")[3]
        for _ in range(3)
    )
    read_bps, read_cpu = read_throughput(inputs, args.repeat)
    print(f"[{dtype}] warm read: {read_bps / 1e9:.2f} GB/s ({read_cpu:.2f} CPU s)", flush=True)
    runs = []
    for _ in range(args.repeat):
        if os.path.exists(output):
            os.unlink(output)
        code = MERGE.format(
            root=ROOT, inputs=inputs, output=output, schedule=args.schedule, threads=args.threads
        )
        out, peak, wall, cpu = _python(code)
        r = json.loads(out)
        r.update(peak_rss=peak, wall_with_startup=wall, cpu_seconds=cpu)
        runs.append(r)
        print(
            f"[{dtype}] merge: {r['bytes_read'] / r['seconds'] / 1e9:.2f} GB/s "
            f"({r['seconds']:.2f} s; {cpu:.2f} CPU s incl. startup), "
            f"peak RSS {peak / 2**20:.0f} MiB",
            flush=True,
        )
    best = min(runs, key=lambda r: r["seconds"])
    worst_err, _, _, _ = _python(CHECK.format(root=ROOT, inputs=inputs, output=output,
                                           schedule=args.schedule))  # fmt: skip
    merge_bps = best["bytes_read"] / best["seconds"]
    result = {
        "dtype": dtype,
        "n": args.n,
        "size_mib": args.size_mib,
        "input_bytes": input_bytes,
        "schedule": args.schedule,
        "threads": best["threads"],
        "read_gb_s": read_bps / 1e9,
        "read_cpu_seconds": read_cpu,
        "merge_cpu_seconds": best["cpu_seconds"] - startup_cpu,
        "read_cpu_s_per_gb": read_cpu / (input_bytes / 1e9),
        "merge_cpu_s_per_gb": (best["cpu_seconds"] - startup_cpu) / (best["bytes_read"] / 1e9),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "merge_gb_s": merge_bps / 1e9,
        "fraction_of_read": merge_bps / read_bps,
        "merge_seconds": best["seconds"],
        "merge_seconds_all": [r["seconds"] for r in runs],
        "peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20,
        "check_max_abs_error": float(worst_err),
    }
    result["targets_met"] = result["fraction_of_read"] >= 0.6 and result["peak_rss_mib"] < 256
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=512, help="size of each checkpoint")
    p.add_argument("-n", type=int, default=8, help="number of checkpoints")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16", "float16"])  # fmt: skip
    p.add_argument("--schedule", default="linear")
    p.add_argument("--threads", type=int, default=None, help="merge threads (default: cores)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (best is reported)")
    p.add_argument("--dir", default=os.path.join(ROOT, "benchmarks", "_work"))
    p.add_argument("--json", default=None, help="write results here (default: DIR/merge.json)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = p.parse_args()
    results = []
    try:
        for dtype in args.dtype:
            results.append(bench_dtype(args, dtype, os.path.join(args.dir, f"merge_{dtype}")))
    finally:
        if not args.keep:
            for dtype in args.dtype:
                shutil.rmtree(os.path.join(args.dir, f"merge_{dtype}"), ignore_errors=True)
    print()
    header = f"{'dtype':<9} {'N x size':>12} {'read GB/s':>10} {'merge GB/s':>11} " \
             f"{'of read':>8} {'peak RSS':>9}  {'CPU s/GB read|merge':>19}  targets"  # fmt: skip
    print(header)
    for r in results:
        print(
            f"{r['dtype']:<9} {r['n']:>4} x {r['size_mib']:>4} MiB {r['read_gb_s']:>8.2f} "
            f"{r['merge_gb_s']:>11.2f} {100 * r['fraction_of_read']:>7.0f}% "
            f"{r['peak_rss_mib']:>6.0f} MiB  "
            f"{r['read_cpu_s_per_gb']:>9.3f} | {r['merge_cpu_s_per_gb']:<7.3f}  "
            f"{'met' if r['targets_met'] else 'MISSED'}"
        )
    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },  # fmt: skip
        "results": results,
    }
    path = args.json or os.path.join(args.dir, "merge.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nwrote {path}")
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine)")


if __name__ == "__main__":
    main()
