"""``polyak demo``: a tour: small checkpoints, three schedules' weights, three merges.

The demo shows what a merge does; whether the merges equal :func:`polyak.average` bit for
bit is checked by the test suite (``tests/test_cli.py``), not here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

from polyak.cli._args import CliError, weights_table
from polyak.utils import format_bytes, order_inputs

__all__ = ["NAME", "HELP", "SCHEDULES", "add_arguments", "run", "make_demo_checkpoints"]

NAME = "demo"
HELP = "generate small checkpoints, merge them with this CLI and show the results"

# (label, `polyak merge` flags, keyword arguments of polyak.schedules.get) per merge shown.
SCHEDULES: list[tuple[str, list[str], dict[str, float]]] = [
    ("equal", ["--schedule", "equal"], {}),
    ("linear", ["--schedule", "linear"], {}),
    ("exponential", ["--schedule", "exponential", "--alpha", "2"], {"alpha": 2.0}),
]
# The tensor whose first element the tour follows through the checkpoints and the merges.
_SHOWN = "encoder.bias"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak demo``."""
    p.add_argument("--dir", default=None,
                   help="folder with checkpoints to use, or where to generate them and keep "
                   "them with the merges (default: a temporary folder, deleted at the end, "
                   "so the commands shown cannot be re-run)")  # fmt: skip
    p.add_argument("-n", type=int, default=5, help="checkpoints to generate (default 5)")


def make_demo_checkpoints(folder: str, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` small checkpoints of a fake training run (float32, bf16, a step counter)."""
    import ml_dtypes

    from polyak.safetensors import save

    rng = np.random.default_rng(seed)
    target = {
        "encoder.weight": rng.standard_normal((512, 512)).astype(np.float32),
        "encoder.bias": rng.standard_normal(512).astype(np.float32),
        "head.weight": rng.standard_normal((256, 512)).astype(np.float32),
    }
    paths = []
    for i in range(1, n + 1):
        noise = 1.0 / i  # later checkpoints sit closer to the optimum, as in training
        tree = {
            "encoder.weight": target["encoder.weight"]
            + noise * rng.standard_normal((512, 512)).astype(np.float32),
            "encoder.bias": target["encoder.bias"]
            + noise * rng.standard_normal(512).astype(np.float32),
            "head.weight": (
                target["head.weight"] + noise * rng.standard_normal((256, 512)).astype(np.float32)
            ).astype(ml_dtypes.bfloat16),
            "step": np.array(1000 * i, dtype=np.int64),
        }
        path = os.path.join(folder, f"step_{1000 * i}.safetensors")
        save(tree, path, {"format": "np", "step": str(1000 * i)})
        paths.append(path)
    return paths


def _checkpoints(folder: str, n: int, temporary: bool) -> list[str]:
    """The checkpoints found in ``folder`` (natural order), else ``n`` new ones."""
    found = order_inputs(
        [os.path.join(folder, f) for f in os.listdir(folder)
         if f.endswith(".safetensors") and not f.startswith("merged")],
        sort="natural",
    )  # fmt: skip
    if found:
        print(f"using {len(found)} checkpoints in {folder}")
        return found
    paths = make_demo_checkpoints(folder, n)
    size = sum(os.path.getsize(p) for p in paths)
    print(f"generated {len(paths)} checkpoints in {folder} ({format_bytes(size)} in all)")
    if temporary:
        print(
            "  (a temporary folder: it is deleted when the demo ends; run "
            "`polyak demo --dir DIR` to keep the checkpoints and re-run the commands below)"
        )
    return paths


def _first_value(path: str) -> float:
    from polyak.safetensors import Checkpoint

    with Checkpoint(path) as ck:
        return float(ck.read_tensor(_SHOWN).reshape(-1)[0])


def _merge_all(folder: str, paths: list[str]) -> int:
    """Run one ``polyak merge`` per schedule, echoing the command and the followed value."""
    from polyak.cli import main  # the command line's own entry point, as a user runs it

    for label, flags, _ in SCHEDULES:
        out = os.path.join(folder, f"merged_{label}.safetensors")
        argv = ["merge", *paths, "-o", out, *flags, "--no-progress"]
        shown = [os.path.basename(a) if a.startswith(folder) else a for a in argv]
        print(f"\n$ polyak {' '.join(shown)}    (in {folder})")
        code = main(argv)
        if code != 0:
            return code
        print(f"  {_SHOWN}[0] of the merge: {_first_value(out):+.6f}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``polyak demo``: weights tables, then each merge through the CLI's own ``main``."""
    import polyak

    if args.n < 1:
        raise CliError(f"-n must be at least 1, got {args.n}")
    own = args.dir is None
    folder = tempfile.mkdtemp(prefix="polyak-demo-") if own else args.dir
    try:
        os.makedirs(folder, exist_ok=True)
        paths = _checkpoints(folder, args.n, own)
        names = [os.path.basename(p) for p in paths]
        for label, _, params in SCHEDULES:
            sched = polyak.schedules.get(label, **params)
            print(f"\n{sched!r} weights (oldest first):")
            print(weights_table(sched.weights(len(paths)), names))
        values = ", ".join(f"{_first_value(p):+.6f}" for p in paths)
        print(f"\n{_SHOWN}[0] per checkpoint, oldest first: {values}")
        code = _merge_all(folder, paths)
        if code == 0:
            print(f"\ndone: {len(SCHEDULES)} merges in {folder}")
        return code
    finally:
        if own:
            shutil.rmtree(folder, ignore_errors=True)
            print(f"deleted {folder} (pass --dir DIR to keep the checkpoints and merges)")
