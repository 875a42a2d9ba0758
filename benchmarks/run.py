"""The polyak benchmark suite: one command, one table, methods side by side.

    python benchmarks/run.py                   # the default run (< 10 min, < 12 GB of disk)
    python benchmarks/run.py --quick           # tiny sizes: checks the suite runs (~1 min)
    python benchmarks/run.py --mib 1024 --out /tmp/results   # bigger files, results elsewhere

Sections (``--only`` picks some):

* ``merge``: N safetensors checkpoints (N = 2, 8 at ``--mib``, N = 32 at ``--mib-32``;
  float32 and bfloat16; a sharded case) merged by ``polyak.safetensors.merge`` with 1 and 2
  threads, against the tutorial recipe, the official reader with accumulation, the torch
  float64 state-dict loop, and the physical references (warm-cache read, ``np.copyto``).
* ``torch``: the same N = 3 checkpoints (``--mib-torch``) as ``torch.save`` ``.pt`` files and
  as safetensors, merged by ``polyak.merge``: peak RSS and throughput of torch inputs.
* ``scaling``: peak RSS of the merge as N and the file size grow, plotted to
  ``memory_scaling.png``.
* ``memory``: in-memory ``polyak.average`` against stacked ``np.average``
  (``benchmarks/average.py``).
* ``online``: ``Averager.update`` against ``np.copyto`` (``benchmarks/online.py``).

Every method runs in its own subprocess; its peak RSS is the kernel's count for that child
(``os.wait4``), its error the largest absolute difference from a float64 average computed
with the official ``safetensors`` reader. Generated files live in ``--workdir`` (a temporary
directory by default) and are deleted as soon as their cases are done. The results go to
``--out`` (``benchmarks/`` by default): ``RESULTS.md``, ``results.json`` and
``memory_scaling.png``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import _checkpoints  # noqa: E402
from benchmarks._harness import available_memory_bytes, machine, run_child  # noqa: E402

METHODS_SCRIPT = str(HERE / "_merge_methods.py")
SECTIONS = ("merge", "torch", "scaling", "memory", "online")
README = HERE.parent / "README.md"
# The README's speed and memory claim sits between these markers; main() rewrites it from the
# numbers of a full run, so the README never states numbers of its own.
README_CLAIM = re.compile(r"(<!-- speed: [^>]*-->)(.*?)(<!-- /speed -->)", re.S)
CONTENDERS = ("polyak 1 thread", "polyak 2 threads", "safe_open + accumulate",
              "torch float64 loop", "tutorial np.average")  # fmt: skip


@dataclass(frozen=True)
class FileSet:
    """Checkpoints sharing a size and dtype; cases use the first ``n`` of them."""

    mib: int
    dtype: str = "float32"
    shard_mib: int | None = None
    torch: bool = False  # also as torch.save .pt files (the torch-input case)

    @property
    def label(self) -> str:
        shards = f", {self.shard_mib} MiB shards" if self.shard_mib else ""
        return f"{self.mib} MiB {self.dtype}{shards}" + (
            ", .pt and safetensors" if self.torch else ""
        )


@dataclass
class Case:
    name: str
    files: FileSet
    n: int
    methods: tuple[str, ...]
    notes: list[str] = field(default_factory=list)


def linear_weights(n: int) -> list[float]:
    """Oldest-first weights 1..n normalized, computed here rather than by polyak."""
    total = n * (n + 1) / 2
    return [(i + 1) / total for i in range(n)]


def merge_cases(args: argparse.Namespace) -> list[Case]:
    f32 = FileSet(args.mib)
    small = FileSet(args.mib_32)
    bf16 = FileSet(args.mib, "bfloat16")
    bf16_small = FileSet(args.mib_32, "bfloat16")
    sharded = FileSet(args.mib, shard_mib=max(1, args.mib // 4))
    every = CONTENDERS
    cases = [
        Case("f32 N=2", f32, 2, every),
        Case("f32 N=8", f32, 8, every),
        Case("f32 N=32", small, 32, every),
        Case("bf16 N=2", bf16, 2, every),
        Case("bf16 N=8", bf16, 8, every),
        Case("bf16 N=32", bf16_small, 32, every),
        Case("f32 N=8 sharded", sharded, 8, every),
    ]
    if args.mib_32 != args.mib:
        cases[2].notes.append(
            f"the N=32 cases use {args.mib_32} MiB files (--mib-32) to stay within the disk "
            "budget; the *inputs* column gives every case's sizes"
        )
    if args.cases:
        unknown = sorted(set(args.cases) - {c.name for c in cases})
        if unknown:
            raise SystemExit(f"--cases: unknown {unknown}; choose among {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.cases]
    return cases


def torch_cases(args: argparse.Namespace) -> list[Case]:
    """The torch-input case: .pt files against the same checkpoints as safetensors."""
    return [
        Case(
            "f32 N=3 torch .pt",
            FileSet(args.mib_torch, torch=True),
            3,
            ("polyak.merge .pt", "polyak.merge .safetensors"),
        )
    ]


def estimate_peak(method: str, case: Case) -> int:
    """Rough peak memory in bytes, to skip a baseline that cannot fit (never polyak)."""
    itemsize = _checkpoints.DTYPES[case.files.dtype].itemsize
    one = case.files.mib << 20
    shapes = _checkpoints.layout(case.files.mib, case.files.dtype).values()
    tensor = max(_size(s) for s in shapes) * itemsize
    if method == "tutorial np.average":
        # every checkpoint, one stacked tensor, float64 temporaries, the output
        return case.n * one + case.n * tensor * (1 + 2 * 8 // itemsize) + one
    if method == "torch float64 loop":
        return one + (8 // itemsize) * one + one
    if method == "safe_open + accumulate":
        return (4 // itemsize) * one + 2 * one
    return 0


def _size(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def method_spec(method: str) -> dict[str, Any]:
    return {
        "polyak 1 thread": {"method": "polyak", "threads": 1},
        "polyak 2 threads": {"method": "polyak", "threads": 2},
        "safe_open + accumulate": {"method": "safe_open"},
        "torch float64 loop": {"method": "torch_f64"},
        "tutorial np.average": {"method": "tutorial"},
        "polyak.merge .pt": {"method": "polyak_any", "threads": 2, "torch_inputs": True},
        "polyak.merge .safetensors": {"method": "polyak_any", "threads": 2},
        "read (warm cache)": {"method": "read"},
        "np.copyto": {"method": "copyto"},
    }[method]


def run_case(case: Case, paths: list[str], workdir: str, args: argparse.Namespace) -> list[dict]:
    """All methods on one case, then one check of every output against the float64 reference."""
    from benchmarks._merge_methods import input_bytes

    inputs = paths[: case.n]
    weights = linear_weights(case.n)
    nbytes = input_bytes(inputs)
    base = {"inputs": inputs, "weights": weights, "bytes": nbytes}
    rows: list[dict] = []
    outputs: dict[str, str] = {}
    if case.files.torch:
        torch_inputs = _checkpoints.torch_copies(inputs, os.path.join(workdir, "torch_inputs"))
    for method in ("read (warm cache)", "np.copyto", *case.methods):
        spec = {**base, **method_spec(method)}
        if spec.pop("torch_inputs", False):
            spec["inputs"] = torch_inputs
        row = {
            "case": case.name,
            "method": method,
            "n": case.n,
            "mib": case.files.mib,
            "dtype": case.files.dtype,
            "sharded": case.files.shard_mib is not None,
            "bytes": nbytes,
            "inputs": f"{case.n} × {case.files.label}",
        }
        need = estimate_peak(method, case)
        if method == "torch float64 loop" and importlib.util.find_spec("torch") is None:
            row["skipped"] = "torch is not installed"
            rows.append(row)
            continue
        if need > 0.8 * available_memory_bytes():
            row["skipped"] = (
                f"needs ~{need / 2**30:.1f} GiB, more than the memory "
                f"available ({available_memory_bytes() / 2**30:.1f} GiB)"
            )
            rows.append(row)
            print(f"  {case.name:<18} {method:<24} skipped: {row['skipped']}", flush=True)
            continue
        if spec["method"] not in ("read", "copyto"):
            sharded_out = spec["method"] == "polyak" and case.files.shard_mib is not None
            out = os.path.join(
                workdir, f"out_{len(outputs)}" + ("" if sharded_out else ".safetensors")
            )
            spec["output"] = out
            outputs[method] = out
        best = None
        # copyto is quick and noisy: best of 3 (read takes the best of 3 passes itself).
        repeats = max(args.repeat, 3) if method == "np.copyto" else args.repeat
        for _ in range(repeats):
            if "output" in spec:
                _remove(spec["output"])
            r = run_child([METHODS_SCRIPT, json.dumps(spec)])
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        assert best is not None
        row.update(
            seconds=best["seconds"],
            gb_per_s=nbytes / best["seconds"] / 1e9,
            peak_rss_mib=best["peak_rss_mib"],
            rss_before_mib=best["rss_before_mib"],
        )
        rows.append(row)
        print(
            f"  {case.name:<18} {method:<24} {row['seconds']:7.2f} s "
            f"{row['gb_per_s']:6.2f} GB/s  peak {row['peak_rss_mib']:7.0f} MiB",
            flush=True,
        )
    if outputs:
        check = run_child(
            [METHODS_SCRIPT, json.dumps({**base, "method": "check", "outputs": outputs})]
        )
        for row in rows:
            if row["method"] in check["errors"]:
                row["max_abs_err"] = check["errors"][row["method"]]
    read = next(r for r in rows if r["method"] == "read (warm cache)")
    for row in rows:
        if "gb_per_s" in row:
            row["of_read"] = row["gb_per_s"] / read["gb_per_s"]
    for out in outputs.values():
        _remove(out)
    if case.files.torch:
        _remove(os.path.join(workdir, "torch_inputs"))
    return rows


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def scaling_points(args: argparse.Namespace) -> list[tuple[FileSet, int, str]]:
    """(files, N, axis): N grows at --scaling-mib, then the file size grows at N = 4."""
    points = [(FileSet(args.scaling_mib), n, "n") for n in args.scaling_ns]
    points += [(FileSet(m), 4, "size") for m in args.scaling_sizes]
    return points


def run_scaling_point(
    files: FileSet, n: int, axis: str, paths: list[str], workdir: str, with_tutorial: bool
) -> list[dict]:
    from benchmarks._merge_methods import input_bytes

    inputs = paths[:n]
    base = {"inputs": inputs, "weights": linear_weights(n), "bytes": input_bytes(inputs)}
    rows = []
    methods = ["polyak 2 threads"] + (["tutorial np.average"] if with_tutorial else [])
    for method in methods:
        out = os.path.join(workdir, "scaling_out.safetensors")
        r = run_child([METHODS_SCRIPT, json.dumps({**base, **method_spec(method), "output": out})])
        _remove(out)
        rows.append(
            {
                "axis": axis,
                "method": method,
                "n": n,
                "mib": files.mib,
                "input_mib": base["bytes"] / 2**20,
                "seconds": r["seconds"],
                "peak_rss_mib": r["peak_rss_mib"],
                "rss_before_mib": r["rss_before_mib"],
            }
        )
        print(
            f"  scaling N={n:<3} {files.mib:>5} MiB  {method:<22} peak "
            f"{r['peak_rss_mib']:7.0f} MiB  ({r['seconds']:.2f} s)",
            flush=True,
        )
    return rows


def run_memory(args: argparse.Namespace) -> list[dict]:
    """In-memory averaging, reusing benchmarks/average.py's children."""
    rows = []
    names = {"polyak": "polyak.average", "np_average_stacked": "np.average (stacked)"}
    for method, label in names.items():
        r = run_child(
            [
                str(HERE / "average.py"),
                "--one",
                method,
                "--n",
                str(args.memory_n),
                "--mib",
                str(args.memory_mib),
            ]
        )
        rows.append(
            {
                "case": f"in-memory N={args.memory_n}",
                "inputs": f"{args.memory_n} × {args.memory_mib} MiB float32 trees",
                "method": label,
                "n": args.memory_n,
                "mib": args.memory_mib,
                "dtype": "float32",
                "bytes": int(r["inputs_mib"] * 2**20),
                "seconds": r["seconds"],
                "gb_per_s": r["gb_per_s"],
                "peak_rss_mib": r["peak_rss_mib"],
                "added_rss_mib": r["peak_rss_added_mib"],
                "max_abs_err": r["max_abs_err"],
            }
        )
        print(
            f"  in-memory {label:<24} {r['seconds']:7.2f} s  added "
            f"{r['peak_rss_added_mib']:.0f} MiB",
            flush=True,
        )
    return rows


def run_online(args: argparse.Namespace) -> list[dict]:
    """``Averager.update`` against ``np.copyto``: benchmarks/online.py, one child per dtype."""
    rows = []
    for dtype in ("float32", "bfloat16"):
        r = run_child(
            [str(HERE / "run.py"), "--online-child", dtype, "--online-mb", str(args.online_mb)]
        )
        for method, key in (("Averager.update (ema)", "update_s"), ("np.copyto", "copy_s")):
            rows.append(
                {
                    "case": f"online {dtype}",
                    "inputs": f"{args.online_mb:g} MB tree",
                    "method": method,
                    "dtype": dtype,
                    "bytes": r["bytes"],
                    "seconds": r[key],
                    "gb_per_s": r["bytes"] / r[key] / 1e9,
                    "peak_rss_mib": r["peak_rss_mib"],
                    "max_rel_err": r.get("max_rel_err") if key == "update_s" else None,
                }
            )
        print(
            f"  online {dtype:<9} update {r['update_s'] * 1e3:7.1f} ms  copy "
            f"{r['copy_s'] * 1e3:7.1f} ms  ratio {r['ratio']:.2f}",
            flush=True,
        )
    return rows


def online_child(dtype: str, mb: float) -> dict[str, Any]:
    """Run benchmarks/online.py's interleaved measurement and read back its medians."""
    import contextlib
    import io
    import re

    from benchmarks import online

    text = io.StringIO()
    ns = argparse.Namespace(mb=mb, repeats=7, dtype=dtype, torch=False)
    with contextlib.redirect_stdout(text):
        ratio = online.bench_numpy(ns)
    out = text.getvalue()
    found = {k: re.search(rf"{k}:\s+([0-9.]+) ms", out) for k in ("np.copyto", "update")}
    size = re.search(r"tree: ([0-9.]+) MB", out)
    err = re.search(r"max relative error ([0-9.e+-]+)", out)
    if not all(found.values()) or size is None:
        raise RuntimeError(f"cannot read benchmarks/online.py's output:\n{out}")
    return {
        "copy_s": float(found["np.copyto"].group(1)) / 1e3,
        "update_s": float(found["update"].group(1)) / 1e3,
        "ratio": ratio,
        "bytes": int(float(size.group(1)) * 1e6),
        "max_rel_err": float(err.group(1)) if err else None,
    }


# --- output ------------------------------------------------------------------------------


def _fmt(row: dict, key: str, spec: str, missing: str = "") -> str:
    v = row.get(key)
    return missing if v is None else format(v, spec)


def _error(row: dict) -> str:
    if row.get("max_abs_err") is not None:
        return format(row["max_abs_err"], ".1e")
    if row.get("max_rel_err") is not None:
        return format(row["max_rel_err"], ".1e") + " (rel.)"
    return ""


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (also what the terminal shows)."""
    head = (
        "| case | inputs | method | seconds | GB/s | of read | peak RSS (MiB) | max error |\n"
        "|---|---|---|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['case']} | {r.get('inputs', '')} | {r['method']} | "
                f"skipped: {r['skipped']} | | | | |"
            )
            continue
        lines.append(
            f"| {r['case']} | {r.get('inputs', '')} | {r['method']} | "
            f"{_fmt(r, 'seconds', '.3g')} | "
            f"{_fmt(r, 'gb_per_s', '.2f')} | {_fmt(r, 'of_read', '.0%')} | "
            f"{_fmt(r, 'peak_rss_mib', '.0f')} | {_error(r)} |"
        )
    return "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    lines = [
        "| N | file (MiB) | inputs (MiB) | method | peak RSS (MiB) | seconds |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["axis"] != "n", r["n"], r["mib"], r["method"])):
        lines.append(
            f"| {r['n']} | {r['mib']} | {r['input_mib']:.0f} | {r['method']} | "
            f"{r['peak_rss_mib']:.0f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def speedups(results: dict[str, Any]) -> dict[str, tuple[list[float], float]]:
    """Per contender: polyak's (2 threads) speed-ups over it, case by case, and its peak RSS."""
    rows = [r for r in results["rows"] if "of_read" in r]
    mine = {r["case"]: r for r in rows if r["method"] == "polyak 2 threads"}
    out = {}
    for method in CONTENDERS[2:]:
        theirs = [r for r in rows if r["method"] == method and r["case"] in mine]
        if theirs:
            speed = [mine[r["case"]]["gb_per_s"] / r["gb_per_s"] for r in theirs]
            out[method] = (speed, max(r["peak_rss_mib"] for r in theirs))
    return out


def readme_claim(results: dict[str, Any]) -> str | None:
    """The README's sentence on the merge's speed and memory, read off a run's numbers."""
    speed = [x for ratios, _ in speedups(results).values() for x in ratios]
    polyak_rows = [
        r for r in results["rows"] if "of_read" in r and r["method"].startswith("polyak")
    ]
    if not speed or not polyak_rows:
        return None
    top = max(r["peak_rss_mib"] for r in polyak_rows)
    return (
        f"{min(speed):.1f}x to {max(speed):.1f}x as fast as the usual load-and-average loops, "
        f"in at most {top:.0f} MiB of peak memory"
    )


def update_readme(claim: str, path: Path = README) -> None:
    """Put ``claim`` between the README's speed markers."""
    text = path.read_text()
    if not README_CLAIM.search(text):
        raise SystemExit(f"{path}: no <!-- speed: ... --> ... <!-- /speed --> markers")
    path.write_text(README_CLAIM.sub(lambda m: m.group(1) + claim + m.group(3), text, count=1))


def summary(results: dict[str, Any]) -> list[str]:
    """A few sentences read off the numbers (never written by hand)."""
    rows = [r for r in results["rows"] if "of_read" in r]
    lines = []
    for method in ("polyak 1 thread", "polyak 2 threads"):
        mine = [r for r in rows if r["method"] == method]
        if mine:
            lo, hi = min(r["of_read"] for r in mine), max(r["of_read"] for r in mine)
            lines.append(
                f"- {method}: {lo:.0%} to {hi:.0%} of the warm-cache read throughput "
                "of the same files."
            )
    polyak_rows = [r for r in rows if r["method"].startswith("polyak")]
    if polyak_rows:
        top = max(r["peak_rss_mib"] for r in polyak_rows)
        lines.append(
            f"- polyak's peak RSS stayed at or below {top:.0f} MiB in every merge case "
            "(interpreter and imports included)."
        )
    for method, (speed, mem) in speedups(results).items():
        lines.append(
            f"- {method}: polyak (2 threads) was {min(speed):.1f}x to "
            f"{max(speed):.1f}x as fast; its peak RSS reached {mem:.0f} MiB."
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """RESULTS.md: the command, date, machine, the tables, the plot."""
    m = results["machine"]
    libs = ", ".join(
        f"{k} {m[k]}" for k in ("python", "numpy", "safetensors", "torch", "ml_dtypes") if m.get(k)
    )
    out = [
        "# Benchmark results",
        "",
        f"- Command: `{results['command']}` (total {results['seconds'] / 60:.1f} min)",
        f"- Date: {results['date']}",
        f"- Machine: {m['cores']} cores, {m['memory_gib']} GiB of memory, {m['cpu']}; {m['os']}",
        f"- Software: {libs}",
        "",
        "Each row is one method in its own subprocess. *seconds*: reading every input, "
        "averaging with linear weights (oldest first) and writing the output, fsync included. "
        "*GB/s*: input bytes per second. *of read*: that throughput as a fraction of reading "
        "the same files from a warm page cache. *peak RSS*: the subprocess's peak resident "
        "memory, interpreter and imports included. *max error*: the largest absolute "
        "difference from a float64 average of the inputs read with the official "
        "`safetensors` reader (outputs are rounded to the input dtype, so bf16 errors are "
        "bf16 roundings); for the online rows, the relative error `benchmarks/online.py` "
        "checks. The in-memory rows come from `benchmarks/average.py` (N snapshots held in "
        "memory by both methods), the online rows from `benchmarks/online.py` (medians of 7 "
        "interleaved updates and copies in one process, so both rows share its peak RSS).",
        "",
        *summary(results),
        "",
        table(results["rows"]),
        "",
    ]
    out += [f"Note: {n}" for n in results["notes"]] + [""] if results["notes"] else []
    if results["scaling"]:
        out += [
            "## Memory scaling",
            "",
            "Peak RSS of the merge (polyak, 2 threads) against the tutorial recipe, as the "
            "number of checkpoints grows (left) and as each checkpoint grows (right):",
            "",
            "![Peak RSS of the merge against N and file size](memory_scaling.png)",
            "",
            scaling_table(results["scaling"]),
            "",
        ]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """Peak RSS against N and against the file size, polyak against the tutorial recipe."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, axis, xkey, xlabel in (
        (axes[0], "n", "n", "checkpoints N"),
        (axes[1], "size", "mib", "file size (MiB), N = 4"),
    ):
        pts = [r for r in rows if r["axis"] == axis]
        for method, style in (("polyak 2 threads", "o-"), ("tutorial np.average", "s--")):
            mine = sorted((r[xkey], r["peak_rss_mib"]) for r in pts if r["method"] == method)
            if mine:
                ax.plot(*zip(*mine), style, label=f"{method} peak RSS")
        inputs = sorted({(r[xkey], r["input_mib"]) for r in pts})
        if inputs:
            ax.plot(*zip(*inputs), ":", color="gray", label="total input size")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for a in (ax.xaxis, ax.yaxis):
            a.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MiB")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    mib = next((r["mib"] for r in rows if r["axis"] == "n"), None)
    axes[0].set_title(f"growing N ({mib} MiB files)")
    axes[1].set_title("growing file size")
    fig.suptitle("Peak RSS of merging safetensors checkpoints (measured per subprocess)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- driver ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections among {', '.join(SECTIONS)}",
    )
    p.add_argument("--mib", type=int, default=512, help="checkpoint size in MiB (default 512)")
    p.add_argument(
        "--mib-32",
        type=int,
        default=128,
        help="checkpoint size of the N=32 case (default 128, for the disk budget)",
    )
    p.add_argument(
        "--mib-torch",
        type=int,
        default=256,
        help="checkpoint size of the torch-input case (default 256: 3 x 256 MiB .pt files)",
    )
    p.add_argument(
        "--cases",
        default=None,
        help="comma-separated merge cases to run (default all), e.g. 'f32 N=8'",
    )
    p.add_argument(
        "--scaling-mib",
        type=int,
        default=64,
        help="file size of the growing-N memory sweep (default 64)",
    )
    p.add_argument("--scaling-ns", default="2,4,8,16,32", help="N of the memory sweep")
    p.add_argument(
        "--scaling-sizes",
        default="64,128,256,512",
        help="file sizes (MiB) of the memory sweep at N = 4",
    )
    p.add_argument("--memory-n", type=int, default=10, help="snapshots, in-memory section")
    p.add_argument("--memory-mib", type=int, default=100, help="MiB per snapshot, in-memory")
    p.add_argument("--online-mb", type=float, default=256.0, help="tree size (MB), online")
    p.add_argument("--online-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest counts")
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the suite runs")
    p.add_argument(
        "--workdir",
        default=None,
        help="where to write checkpoints (default: a temporary directory, deleted at the end)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="where to write RESULTS.md, results.json and memory_scaling.png "
        "(default: benchmarks/; with --quick, a temporary directory)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="polyak-bench-quick-") if args.quick else str(HERE)
    if args.quick:
        args.mib, args.mib_32, args.scaling_mib, args.mib_torch = 8, 2, 2, 4
        args.scaling_sizes, args.scaling_ns = "2,8", "2,8"
        args.memory_n, args.memory_mib, args.online_mb = 4, 8, 8.0
    args.scaling_ns = [int(x) for x in args.scaling_ns.split(",")]
    args.scaling_sizes = [int(x) for x in args.scaling_sizes.split(",")]
    args.cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(args.only) - set(SECTIONS))
    if bad:
        p.error(f"--only: unknown section(s) {bad}; choose among {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.online_child:
        result = online_child(args.online_child, args.online_mb)
        print(json.dumps(result))
        return result
    started = time.time()
    os.makedirs(args.out, exist_ok=True)  # fail now, not after the run, if it cannot be made
    workdir = args.workdir or tempfile.mkdtemp(prefix="polyak-bench-")
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "rows": [],
        "scaling": [],
        "notes": [],
    }
    # Work goes file set by file set, so each set is written once, used by every case and
    # sweep point that needs it, and deleted before the next is written.
    jobs: dict[FileSet, list[tuple[str, Any]]] = {}
    if "merge" in args.only:
        for case in merge_cases(args):
            jobs.setdefault(case.files, []).append(("case", case))
            results["notes"] += case.notes
    if "torch" in args.only:
        for case in torch_cases(args):
            jobs.setdefault(case.files, []).append(("case", case))
    if "scaling" in args.only:
        for files, n, axis in scaling_points(args):
            jobs.setdefault(files, []).append(("scaling", (n, axis)))
    try:
        _check_disk(jobs, workdir)
        for files, todo in jobs.items():
            count = max(j[1].n if j[0] == "case" else j[1][0] for j in todo)
            folder = os.path.join(workdir, "inputs")
            print(f"writing {count} checkpoints of {files.label} ...", flush=True)
            paths = _checkpoints.write_set(
                folder, count, files.mib, files.dtype, shard_mib=files.shard_mib
            )
            for kind, job in todo:
                if kind == "case":
                    results["rows"] += run_case(job, paths, workdir, args)
                else:
                    n, axis = job
                    tutorial_fits = 3 * n * (files.mib << 20) < 0.6 * available_memory_bytes()
                    results["scaling"] += run_scaling_point(
                        files, n, axis, paths, workdir, tutorial_fits
                    )
            shutil.rmtree(folder)
        if "memory" in args.only:
            results["rows"] += run_memory(args)
        if "online" in args.only:
            results["rows"] += run_online(args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["notes"] += [
        f"{r['case']}: {r['method']} skipped, {r['skipped']}"
        for r in results["rows"]
        if "skipped" in r
    ]
    print()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results["rows"]))
    if results["scaling"]:
        print()
        print(scaling_table(results["scaling"]))
        plot(results["scaling"], os.path.join(args.out, "memory_scaling.png"))
    for note in results["notes"]:
        print(f"note: {note}")
    m = results["machine"]
    print(
        f"\n{m['cores']} cores, {m['memory_gib']} GiB, {m['cpu']}; "
        f"total {results['seconds'] / 60:.1f} min"
    )
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(markdown(results))
    plotted = ", memory_scaling.png" if results["scaling"] else ""
    print(f"written: RESULTS.md, results.json{plotted} in {args.out}")
    claim = readme_claim(results)
    if Path(args.out).resolve() == HERE and claim:
        update_readme(claim)  # the committed results: the README quotes them
        print(f"README.md: {claim}")
    return results


def _check_disk(jobs: dict[FileSet, list[tuple[str, Any]]], workdir: str) -> None:
    """Refuse to start when the largest file set and its outputs would not fit on disk."""
    need = 0
    for files, todo in jobs.items():
        count = max(j[1].n if j[0] == "case" else j[1][0] for j in todo)
        need = max(need, (count + len(CONTENDERS) + 1) * (files.mib << 20))
    free = shutil.disk_usage(workdir).free
    if need > free:
        raise SystemExit(
            f"the benchmark needs ~{need / 1e9:.1f} GB free in {workdir}, "
            f"only {free / 1e9:.1f} GB are; pass --workdir or smaller --mib"
        )


if __name__ == "__main__":
    main()
