"""``polyak inspect``: a checkpoint's tensors, dtypes, shapes, sizes and metadata.

Every kind :func:`polyak.merge` reads: safetensors files and sharded folders, torch zip
files, Hugging Face model folders and DCP folders. It says where the weights sit (the key in
a nested torch checkpoint, the weight files of a model folder) and, for a nested checkpoint
opened without ``--key``, lists the keys that hold tensor mappings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from polyak.utils import format_bytes

__all__ = ["NAME", "HELP", "add_arguments", "run"]

NAME = "inspect"
HELP = "list a checkpoint's tensors, dtypes, shapes, sizes, metadata and where weights sit"

Row = tuple[str, str, tuple[int, ...], int, int]  # name, dtype code, shape, bytes, elements


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``polyak inspect``."""
    p.add_argument(
        "checkpoint", metavar="CKPT",
        help="a checkpoint of any kind: safetensors file or folder, torch file, model folder, DCP",
    )  # fmt: skip
    p.add_argument(
        "--key", default=None,
        help="where the weights sit in a nested torch or DCP checkpoint (e.g. state_dict)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """Run ``polyak inspect``: print the checkpoint as a table, or as JSON with ``--json``."""
    from polyak.checkpoints import detect

    kind = detect(args.checkpoint)
    if kind == "safetensors" and args.key is None:
        return _run_safetensors(args)
    return _run_other(args, kind)


def _run_safetensors(args: argparse.Namespace) -> int:
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


def _reader_rows(ck: Any) -> list[Row]:
    rows: list[Row] = []
    for name in ck.keys():
        dtype, shape = ck.info(name)
        n = math.prod(shape)
        rows.append((name, str(dtype), tuple(shape), n * dtype.itemsize, n))
    return rows


def _where(path: str, kind: str, ck: Any, key: str | None) -> list[str]:
    """Lines saying where the weights sit and what else the checkpoint holds."""
    from polyak.checkpoints import find_weights, model_files

    lines = []
    if kind == "huggingface":
        fmt, files = find_weights(path)
        lines.append(f"weights: {fmt}, {', '.join(os.path.basename(f) for f in files)}")
        lines.append(f"model files (copied by merge): {', '.join(model_files(path)) or 'none'}")
    if key is not None:
        lines.append(f"weights under key {key!r}")
    others = [c for c in getattr(ck, "candidates", []) if c != key]
    if others:
        lines.append(f"other keys holding tensor mappings: {', '.join(others)}")
    return lines


def _run_other(args: argparse.Namespace, kind: str) -> int:
    from polyak.checkpoints import KeyChoiceError, open_checkpoint

    path = args.checkpoint
    try:
        ck = open_checkpoint(path, key=args.key)
    except KeyChoiceError as e:
        if args.key is not None or not e.candidates:
            raise
        return _print_candidates(args, kind, e.candidates)
    with ck:
        rows = _reader_rows(ck)
        meta = dict(ck.metadata or {})
        where = _where(path, kind, ck, args.key)
    if args.json:
        out = {
            "path": path,
            "kind": kind,
            "key": args.key,
            "where": where,
            "tensors": [
                {"name": n, "dtype": d, "shape": list(s), "nbytes": b} for n, d, s, b, _ in rows
            ],
            "metadata": meta,
        }
        print(json.dumps(out, indent=2))
        return 0
    # Names, keys and paths come from the file: escaped, as in _print_table.
    print(f"{printable(path)}: {_KIND_NAMES[kind]}")
    for line in where:
        print(f"  {printable(line)}")
    _print_rows([(printable(r[0]), *r[1:]) for r in rows])
    _print_metadata(meta)
    return 0


_KIND_NAMES = {
    "safetensors": "safetensors checkpoint",
    "torch": "torch checkpoint (torch.save zip)",
    "huggingface": "Hugging Face model folder",
    "dcp": "torch.distributed.checkpoint folder",
}


def _print_candidates(args: argparse.Namespace, kind: str, candidates: list[str]) -> int:
    """A nested checkpoint opened without --key: each key holding tensors, with its size."""
    from polyak.checkpoints import open_checkpoint

    found = []
    for key in candidates:
        with open_checkpoint(args.checkpoint, key=key) as ck:
            rows = _reader_rows(ck)
        found.append((key, len(rows), sum(r[3] for r in rows)))
    if args.json:
        out = {
            "path": args.checkpoint,
            "kind": kind,
            "key": None,
            "candidates": [{"key": k, "tensors": n, "nbytes": b} for k, n, b in found],
        }
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{printable(args.checkpoint)}: {_KIND_NAMES[kind]}, nested: the weights sit under a key"
    )
    found = [(printable(k), n, b) for k, n, b in found]
    width = max(len(k) for k, _, _ in found)
    for key, n, nbytes in found:
        print(f"  --key {key:<{width}}  {n:>6} tensors  {format_bytes(nbytes):>10}")
    print(f"  pass --key {found[0][0]} to list its tensors (polyak inspect/merge --key)")
    return 0


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``): names and
    metadata come from the file, and raw control sequences would drive the terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _print_table(path: str, rows: list[Row], layout: Any) -> None:
    path = printable(path)
    rows = [(printable(r[0]), *r[1:]) for r in rows]
    if layout is not None:
        layout = [(printable(f), names) for f, names in layout]
    sharded = layout is not None
    kind = f"sharded checkpoint, {len(layout)} shards" if sharded else "safetensors file"
    print(f"{path}: {kind}")
    if layout is not None:
        sizes = {name: nbytes for name, _, _, nbytes, _ in rows}
        width = max(len(f) for f, _ in layout)
        for shard, names in layout:
            total = format_bytes(sum(sizes[printable(n)] for n in names))
            print(f"  {shard:<{width}}  {len(names):>6} tensors  {total:>10}")
    _print_rows(rows)


def _print_rows(rows: list[Row]) -> None:
    wn = max([len(r[0]) for r in rows] + [6])
    ws = max([len(str(list(r[2]))) for r in rows] + [5])
    wd = max([len(r[1]) for r in rows] + [7])
    print(f"  {'tensor':<{wn}}  {'dtype':<{wd}}  {'shape':<{ws}}  {'size':>10}")
    for name, code, shape, nbytes, _ in rows:
        print(
            f"  {name:<{wn}}  {code:<{wd}}  {str(list(shape)):<{ws}}  {format_bytes(nbytes):>10}"
        )
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
        k, v = printable(k), printable(v)
        print(f"    {k}: {v if len(v) <= 200 else v[:197] + '...'}")
