"""The contenders of the checkpoint-merge benchmark, each run alone in a child process.

    python benchmarks/_merge_methods.py '<json spec>'

The spec names the method, the inputs (``.safetensors`` files or sharded directories, oldest
first), the output and the weights. The child prints one JSON line: the seconds of the timed
part (reading every input, averaging, writing the output and fsync-ing it, so that every
method pays for the same durable result), the input bytes, and its RSS before the work.

Methods:

* ``polyak``: ``polyak.safetensors.merge`` with ``threads`` worker threads.
* ``polyak_any``: the format-neutral ``polyak.merge`` (any input kind: the torch-input case
  gives it ``.pt`` files and the same checkpoints as safetensors).
* ``tutorial``: load every checkpoint, ``np.average`` over the stacked tensors, save.
* ``safe_open``: the official ``safetensors`` reader, one file at a time, accumulating
  ``w * x`` into float32 arrays.
* ``torch_f64``: the state-dict loop of common checkpoint-averaging scripts (timm's
  ``avg_checkpoints.py``, fairseq's ``average_checkpoints.py``): load a state dict,
  accumulate in float64, cast back, save with ``safetensors.torch``.
* ``read``: the physical reference: read every input byte from a warm page cache into one
  reused buffer (``read_throughput`` of ``benchmarks/merge.py``, best of three).
* ``copyto``: the memory reference: ``np.copyto`` moving as many bytes as the inputs hold.
* ``check``: not a contender: the float64 reference average of the inputs (read with the
  official reader) and the largest absolute error of every output against it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from typing import Any

import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, for the official reader
import numpy as np

# The reference and the baselines read with the official reader, never with polyak.
from safetensors import safe_open

_sys_path_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _sys_path_root not in sys.path:
    sys.path.insert(0, _sys_path_root)

from benchmarks._harness import current_rss_mib  # noqa: E402

INDEX = "model.safetensors.index.json"


def shard_files(ckpt: str) -> list[str]:
    """The ``.safetensors`` files of a checkpoint: itself, or a directory's shards."""
    if os.path.isfile(ckpt):
        return [ckpt]
    with open(os.path.join(ckpt, INDEX)) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(ckpt, n) for n in names]


def input_bytes(paths: list[str]) -> int:
    return sum(os.path.getsize(f) for p in paths for f in shard_files(p))


def _fsync(path: str) -> None:
    for f in shard_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_numpy(ckpt: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in shard_files(ckpt):
        out.update(load_file(f))
    return out


def run_polyak(spec: dict[str, Any]) -> None:
    import polyak.safetensors as pst

    report = pst.merge(
        spec["inputs"], spec["output"], list(spec["weights"]), threads=spec["threads"]
    )
    if not np.allclose(report.weights, spec["weights"], rtol=1e-12, atol=0):
        raise RuntimeError(f"polyak used weights {report.weights}, not {spec['weights']}")


def run_polyak_any(spec: dict[str, Any]) -> None:
    import polyak

    report = polyak.merge(
        spec["inputs"], spec["output"], list(spec["weights"]), threads=spec["threads"]
    )
    if not np.allclose(report.weights, spec["weights"], rtol=1e-12, atol=0):
        raise RuntimeError(f"polyak used weights {report.weights}, not {spec['weights']}")


def run_tutorial(spec: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    w = np.asarray(spec["weights"])
    states = [_load_numpy(p) for p in spec["inputs"]]
    out = {
        k: np.average(np.stack([s[k] for s in states]), axis=0, weights=w).astype(v.dtype)
        for k, v in states[0].items()
    }
    save_file(out, spec["output"])


def run_safe_open(spec: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    acc: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    for i, ckpt in enumerate(spec["inputs"]):
        w = np.float32(spec["weights"][i])
        for f in shard_files(ckpt):
            with safe_open(f, framework="numpy") as fh:
                for k in fh.keys():
                    x = fh.get_tensor(k)
                    if i == 0:
                        acc[k] = w * x.astype(np.float32)
                        dtypes[k] = x.dtype
                    else:
                        acc[k] += w * x
    save_file({k: v.astype(dtypes[k]) for k, v in acc.items()}, spec["output"])


def run_torch_f64(spec: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    avg: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}
    for i, ckpt in enumerate(spec["inputs"]):
        state: dict[str, Any] = {}
        for f in shard_files(ckpt):
            state.update(load_file(f))
        for k, v in state.items():
            dtypes.setdefault(k, v.dtype)
            v = v.to(torch.float64).mul_(spec["weights"][i])
            if k in avg:
                avg[k].add_(v)
            else:
                avg[k] = v
        del state
    save_file({k: v.to(dtypes[k]) for k, v in avg.items()}, spec["output"])


def run_read(spec: dict[str, Any]) -> None:
    # The same measurement as benchmarks/merge.py (issue 3's merge benchmark): a warm-up
    # pass, then the best of three passes of large readinto calls into one reused buffer.
    from benchmarks.merge import read_throughput

    files = [f for ckpt in spec["inputs"] for f in shard_files(ckpt)]
    bytes_per_s, _ = read_throughput(files, 3)
    spec["_seconds"] = spec["bytes"] / bytes_per_s


def run_copyto(spec: dict[str, Any]) -> None:
    chunk = min(spec["bytes"], 256 << 20) // 4
    src = np.ones(chunk, np.float32)
    dst = np.zeros(chunk, np.float32)
    np.copyto(dst, src)  # fault dst's pages in before the clock starts
    moved = 0
    start = time.perf_counter()
    while moved < spec["bytes"]:
        np.copyto(dst, src)
        moved += src.nbytes
    spec["_seconds"] = time.perf_counter() - start
    spec["_moved"] = moved


def run_check(spec: dict[str, Any]) -> dict[str, float]:
    """Largest |output - float64 reference| per output; the reference uses the official reader."""
    w = np.asarray(spec["weights"], np.float64)
    with ExitStack() as stack:

        def handles(ckpt: str) -> dict[str, Any]:
            found = {}
            for f in shard_files(ckpt):
                fh = stack.enter_context(safe_open(f, framework="numpy"))
                found.update(dict.fromkeys(fh.keys(), fh))
            return found

        inputs = [handles(p) for p in spec["inputs"]]
        outputs = {m: handles(p) for m, p in spec["outputs"].items()}
        errors = dict.fromkeys(outputs, 0.0)
        for k in sorted(inputs[0]):
            ref = np.zeros(inputs[0][k].get_slice(k).get_shape(), np.float64)
            for wi, h in zip(w, inputs):
                ref += wi * h[k].get_tensor(k).astype(np.float64)
            for m, h in outputs.items():
                if sorted(h) != sorted(inputs[0]):
                    raise RuntimeError(f"{m}: the output's tensors differ from the inputs'")
                got = h[k].get_tensor(k).astype(np.float64)
                errors[m] = max(errors[m], float(np.max(np.abs(got - ref))))
    return errors


METHODS = {
    "polyak": run_polyak,
    "polyak_any": run_polyak_any,
    "tutorial": run_tutorial,
    "safe_open": run_safe_open,
    "torch_f64": run_torch_f64,
    "read": run_read,
    "copyto": run_copyto,
}


def main(spec: dict[str, Any]) -> dict[str, Any]:
    method = spec["method"]
    if method == "check":
        return {"errors": run_check(spec)}
    if method == "torch_f64":
        import torch  # noqa: F401  imported before the RSS baseline, like numpy
    elif method == "polyak":
        import polyak.safetensors  # noqa: F401
    elif method == "polyak_any":
        import polyak.checkpoints  # noqa: F401  (no torch: .pt files are read without it)
    rss_before = current_rss_mib()
    start = time.perf_counter()
    METHODS[method](spec)
    if method in ("polyak", "polyak_any", "tutorial", "safe_open", "torch_f64"):
        _fsync(spec["output"])
    seconds = spec.get("_seconds", time.perf_counter() - start)
    return {
        "method": method,
        "seconds": seconds,
        "bytes": spec["bytes"],
        "rss_before_mib": rss_before,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
