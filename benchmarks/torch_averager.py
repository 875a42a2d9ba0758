"""polyak.torch.ModelAverager.update against the fastest peer, interleaved in one process.

Three model shapes: a ResNet-50 (hand-written layout: convolutions and BatchNorm, no
torchvision), 1000 ``Linear(8, 8)`` layers (per-tensor overhead, what a GPU sees), and a
GPT-2-small in bf16 with a float32 average. Peers: torch ``AveragedModel`` with
``get_ema_multi_avg_fn``, timm ``ModelEmaV3`` (its own ``model_ema.py``, when timm is
installed) and a hand-written ``torch._foreach_lerp_`` over ``parameters()``/``buffers()``.
Each round perturbs the model (untimed), then every method folds it once, in turn; the
table gives each method's median time per update and polyak's time over the fastest peer's.
After timing, every method's average is checked against polyak's.

Run:  python3 benchmarks/torch_averager.py [--device cuda] [--rounds 30] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import polyak.torch as pt
from polyak import schedules

DECAY = 0.999


def resnet50(width: int = 64) -> nn.Module:
    """ResNet-50's parameters and buffers (conv + BatchNorm bottlenecks, 3-4-6-3)."""

    def conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, bias=False), nn.BatchNorm2d(cout)]

    layers: list[nn.Module] = conv_bn(3, width, 7)
    cin = width
    for i, blocks in enumerate((3, 4, 6, 3)):
        mid = width * 2**i
        for b in range(blocks):
            block = conv_bn(cin, mid, 1) + conv_bn(mid, mid, 3) + conv_bn(mid, mid * 4, 1)
            if b == 0:
                block += conv_bn(cin, mid * 4, 1)  # the downsample branch
            layers.append(nn.Sequential(*block))
            cin = mid * 4
    layers.append(nn.Linear(cin, 1000 if width == 64 else 10))
    return nn.Sequential(*layers)


def linears(n: int = 1000) -> nn.Module:
    return nn.Sequential(*(nn.Linear(8, 8) for _ in range(n)))


def gpt2(width: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> nn.Module:
    """GPT-2 small's parameters (embeddings, 12 blocks of attention and MLP, LayerNorms)."""

    def block() -> nn.Module:
        return nn.ModuleDict({
            "ln_1": nn.LayerNorm(width), "c_attn": nn.Linear(width, 3 * width),
            "attn_proj": nn.Linear(width, width), "ln_2": nn.LayerNorm(width),
            "c_fc": nn.Linear(width, 4 * width), "mlp_proj": nn.Linear(4 * width, width),
        })  # fmt: skip

    return nn.ModuleDict({
        "wte": nn.Embedding(vocab, width), "wpe": nn.Embedding(ctx, width),
        "h": nn.ModuleList(block() for _ in range(layers)), "ln_f": nn.LayerNorm(width),
    })  # fmt: skip


def timm_model_ema_v3():
    """timm's ``ModelEmaV3`` from its own file (the package import needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "utils" / "model_ema.py"
    mod_spec = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.ModelEmaV3


def methods(model: nn.Module, low_precision: bool) -> dict[str, tuple[Callable, Callable]]:
    """name -> (update, read the float average as a dict); all start from the model."""
    out = {}
    avg = pt.ModelAverager(model, schedules.ema(DECAY))
    avg.update()  # the first fold copies, as the peers' construction does
    out["polyak ModelAverager"] = (avg.update, lambda: avg.state_dict()["average"])

    if not low_precision:  # AveragedModel cannot keep a float32 average of bf16 weights
        am = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
        am.update_parameters(model)
        out["torch AveragedModel"] = (
            lambda: am.update_parameters(model),
            lambda: am.module.state_dict(),
        )
    ModelEmaV3 = timm_model_ema_v3()
    if ModelEmaV3 is not None:
        ema = ModelEmaV3(model, decay=DECAY, dtype=torch.float32 if low_precision else None)
        out["timm ModelEmaV3"] = (lambda: ema.update(model), lambda: ema.module.state_dict())

    shadow = [t.detach().to(torch.float32 if low_precision else t.dtype, copy=True)
              for t in itertools.chain(model.parameters(), model.buffers())
              if t.is_floating_point()]  # fmt: skip
    names = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers())
             if t.is_floating_point()]  # fmt: skip

    @torch.no_grad()
    def hand() -> None:
        src = [t for t in itertools.chain(model.parameters(), model.buffers())
               if t.is_floating_point()]  # fmt: skip
        if low_precision:
            torch._foreach_mul_(shadow, DECAY)
            torch._foreach_add_(shadow, src, alpha=1 - DECAY)
        else:
            torch._foreach_lerp_(shadow, src, 1 - DECAY)

    out["hand-written foreach"] = (hand, lambda: dict(zip(names, shadow)))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_shape(name: str, model: nn.Module, device: torch.device, rounds: int) -> dict:
    low = next(model.parameters()).dtype == torch.bfloat16
    ms = methods(model, low)
    params = [p for p in model.parameters()]
    times: dict[str, list[float]] = {m: [] for m in ms}
    for r in range(rounds + 2):  # two warm-up rounds
        with torch.no_grad():
            torch._foreach_add_(params, 1e-3 * (-1) ** r)  # a new model each round, untimed
        order = list(ms.items())
        for m, (update, _) in order[r % len(order):] + order[: r % len(order)]:  # rotate
            sync(device)
            t0 = time.perf_counter()
            update()
            sync(device)
            if r >= 2:
                times[m].append(time.perf_counter() - t0)
    reference = ms["polyak ModelAverager"][1]()
    rows = {}
    for m, (_, read) in ms.items():
        state = read()
        err = max(
            (state[k].double() - reference[k].double()).abs().max().item()
            for k in reference if reference[k].is_floating_point()
        )  # fmt: skip
        rows[m] = {"median_ms": 1e3 * statistics.median(times[m]), "max_abs_err": err}
    peers = {m: r for m, r in rows.items() if m != "polyak ModelAverager"}
    fastest = min(peers, key=lambda m: peers[m]["median_ms"])
    ratio = rows["polyak ModelAverager"]["median_ms"] / peers[fastest]["median_ms"]
    tensors = sum(1 for _ in itertools.chain(model.parameters(), model.buffers()))
    return {"shape": name, "tensors": tensors, "rows": rows, "fastest_peer": fastest,
            "ratio": ratio}  # fmt: skip


def shapes(quick: bool) -> list[tuple[str, Callable[[], nn.Module], torch.dtype]]:
    if quick:
        return [
            ("ResNet-50-shaped", lambda: resnet50(width=4), torch.float32),
            ("1000 x Linear(8, 8)", lambda: linears(50), torch.float32),
            ("GPT-2-small-shaped bf16", lambda: gpt2(16, 2, 100, 32), torch.bfloat16),
        ]
    return [
        ("ResNet-50-shaped", resnet50, torch.float32),
        ("1000 x Linear(8, 8)", linears, torch.float32),
        ("GPT-2-small-shaped bf16", gpt2, torch.bfloat16),
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=30, help="timed updates per method")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny models: does it run?")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    for name, build, dtype in shapes(args.quick):
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype)
        results.append(bench_shape(name, model, device, args.rounds))
        del model
    print(f"device {device}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
          f"torch {torch.__version__}, ema decay {DECAY}")  # fmt: skip
    print("| shape | tensors | method | median ms/update | max abs diff vs polyak |")
    print("|---|---|---|---|---|")
    for res in results:
        for m, r in res["rows"].items():
            print(f"| {res['shape']} | {res['tensors']} | {m} | {r['median_ms']:.3f} | "
                  f"{r['max_abs_err']:.1e} |")  # fmt: skip
    for res in results:
        print(f"{res['shape']}: polyak / fastest peer ({res['fastest_peer']}) = "
              f"{res['ratio']:.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
