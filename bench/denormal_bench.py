"""Denormal floats in a backward pass, by flush mode and thread count.

As a network fits its training set, the loss gradients of confidently fitted points shrink below
float32's smallest normal number (1.2e-38) and every product with them takes the CPU's slow path.
This times one backward pass of a small conv net on 32×32 RGB images whose output gradients are
of that size, with denormals

- ``off``: kept (PyTorch's default),
- ``calling thread``: flushed by ``torch.set_flush_denormal(True)`` on the calling thread only
  (what ``engine.models.threads.intra_op_threads`` did before: the flag is per thread),
- ``every thread``: flushed on the calling thread and its OpenMP team
  (:func:`engine.models.threads.set_flush_denormal_everywhere`, what it does now),

at 1 and 2 intra-op threads, against the same backward with normal-sized gradients (the rate
without denormals) and a plain forward + backward of the same net and batch; with the process's
peak RSS. Median of ``--reps`` timed passes after one warm-up.

    .venv/bin/python bench/denormal_bench.py        # -> bench/results/denormal_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from engine.models.threads import set_flush_denormal_everywhere

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "denormal_bench.json"
MODES = ("off", "calling thread", "every thread")


def model() -> nn.Module:
    """Two conv-BatchNorm-ReLU blocks and a linear head (a ResNet's ingredients)."""
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 10))
    return net.train()


def backward_s(net: nn.Module, x: torch.Tensor, scale: float, reps: int, *, where: str) -> float:
    """Median seconds of one backward pass whose gradients are of size ``scale``: the output's
    (``where="head"``), or the first block's feature map's (``"features"``, b × 32 × 32 × 32:
    the gradient reaching the first block is replaced by one of that size; large elementwise
    ops split over every thread)."""
    times = []
    first_block_out = net[2]  # the first ReLU
    for i in range(reps + 1):
        net.zero_grad(set_to_none=True)
        feats: list[torch.Tensor] = []
        handle = first_block_out.register_forward_hook(lambda _m, _i, out, keep=feats: keep.append(out))
        out = net(x)  # (b, 10)
        handle.remove()
        if where == "features":
            tiny = torch.full_like(feats[0], scale)  # made unflushed: denormal when scale is
            feats[0].register_hook(lambda _g, t=tiny: t)
            grad = torch.full_like(out, 1e-3)
        else:
            grad = torch.full_like(out, scale)
        t = time.perf_counter()
        out.backward(grad)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_step_s(net: nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median seconds of a plain forward + backward (cross-entropy on random labels) of the same
    net and batch: the reference rate of this machine."""
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(reps + 1):
        net.zero_grad(set_to_none=True)
        t = time.perf_counter()
        nn.functional.cross_entropy(net(x), y).backward()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = model()
    x = torch.randn(args.batch, 3, 32, 32)
    rows = []
    for where in ("head", "features"):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            set_flush_denormal_everywhere(False)
            plain = plain_step_s(net, x, args.reps)
            normal = backward_s(net, x, 1e-3, args.reps, where=where)
            for mode in MODES:
                set_flush_denormal_everywhere(False)
                if mode == "calling thread":
                    torch.set_flush_denormal(True)
                elif mode == "every thread":
                    set_flush_denormal_everywhere(True)
                s = backward_s(net, x, 1e-39, args.reps, where=where)
                rows.append({"denormal_gradients": where, "threads": threads, "mode": mode,
                             "backward_ms": 1e3 * s, "normal_ms": 1e3 * normal, "slowdown": s / normal,
                             "plain_forward_backward_ms": 1e3 * plain})
            set_flush_denormal_everywhere(False)
    print(f"{'gradients':<9} {'threads':>7}  {'denormals':<15} {'backward ms':>11}  {'normal ms':>9}  "
          f"{'x normal':>8}  {'plain fwd+bwd ms':>16}")
    for r in rows:
        print(f"{r['denormal_gradients']:<9} {r['threads']:>7}  {r['mode']:<15} {r['backward_ms']:>11.1f}  "
              f"{r['normal_ms']:>9.1f}  {r['slowdown']:>8.2f}  {r['plain_forward_backward_ms']:>16.1f}")
    load = os.getloadavg()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    print(f"load average {load}; peak RSS {peak / 1e6:.0f} MB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"case": {"batch": args.batch, "reps": args.reps, "torch": torch.__version__,
                                              "machine": platform.machine(), "cores": os.cpu_count(),
                                              "load_average": load, "peak_rss_bytes": peak}, "rows": rows},
                                    indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
