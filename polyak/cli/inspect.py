"""``polyak inspect``: a checkpoint's tensors, dtypes, shapes, sizes and metadata."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from polyak.utils import format_bytes

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "inspect"
HELP = "list a checkpoint's tensors, dtypes, shapes, sizes and metadata"

Row = tuple[str, str, tuple[int, ...], int, int]  # name, dtype code, shape, bytes, elements


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak inspect``."""
    p.add_argument("checkpoint", metavar="CKPT", help="a .safetensors file or sharded directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``polyak inspect``: print the checkpoint as a table, or as JSON with ``--json``."""
    from polyak.safetensors import Checkpoint

    with Checkpoint(args.checkpoint) as ck:
        rows: list[Row] = []
        for name in ck.keys():
            info = ck.tensor_info(name)
            rows.append((name, info.code, info.shape, info.nbytes, math.prod(info.shape)))
        meta = dict(ck.metadata or {})
        layout = ck.layout() if ck.sharded else None
    if args.json:
        out = {
            "path": args.checkpoint,
            "shards": [f for f, _ in layout] if layout is not None else None,
            "tensors": [
                {"name": n, "dtype": d, "shape": list(s), "nbytes": b} for n, d, s, b, _ in rows
            ],
            "metadata": meta,
        }
        print(json.dumps(out, indent=2))
        return 0
    _print_table(args.checkpoint, rows, layout)
    _print_metadata(meta)
    return 0


def _print_table(path: str, rows: list[Row], layout: Any) -> None:
    sharded = layout is not None
    kind = f"sharded checkpoint, {len(layout)} shards" if sharded else "safetensors file"
    print(f"{path}: {kind}")
    if layout is not None:
        sizes = {name: nbytes for name, _, _, nbytes, _ in rows}
        width = max(len(f) for f, _ in layout)
        for shard, names in layout:
            total = format_bytes(sum(sizes[n] for n in names))
            print(f"  {shard:<{width}}  {len(names):>6} tensors  {total:>10}")
    wn = max([len(r[0]) for r in rows] + [6])
    ws = max([len(str(list(r[2]))) for r in rows] + [5])
    print(f"  {'tensor':<{wn}}  {'dtype':<7}  {'shape':<{ws}}  {'size':>10}")
    for name, code, shape, nbytes, _ in rows:
        print(f"  {name:<{wn}}  {code:<7}  {str(list(shape)):<{ws}}  {format_bytes(nbytes):>10}")
    total = sum(r[3] for r in rows)
    params = sum(r[4] for r in rows)
    print(f"  {len(rows)} tensors, {params:,} elements, {format_bytes(total)}")


def _print_metadata(meta: dict[str, str]) -> None:
    if not meta:
        return
    print("  metadata:")
    for k, v in meta.items():
        if k == "polyak":
            try:
                v = json.dumps(json.loads(v))
            except ValueError:
                pass
        print(f"    {k}: {v if len(v) <= 200 else v[:197] + '...'}")
