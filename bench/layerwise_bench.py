"""Layer-wise Kronecker projection vs a plain forward + backward vs vmap per-sample gradients.

On a ResNet-18-style network for 32×32×3 images (BatchNorm, eval mode, ~11.2M parameters),
batch 64, float32, the CPU: images/s and peak RSS of

  (a) plain: forward + backward of the mean loss (parameter gradients), the model's own cost;
  (b) kronecker: ``layerwise_grads`` with a ``KroneckerProjector`` to K columns (all layers,
      K split by each layer's gradient energy on 16 calibration images, timed as setup);
  (c) vmap: ``Objective.sample_grads`` (full per-sample gradients, vmap(grad)) on small chunks,
      and the dense ``Projector``'s cost per chunk, measured on a few of its slabs and
      extrapolated (P (p, K) cannot be held: 11.2M × 4096 × 4 B = 183 GB).

Each mode runs in its own subprocess so its peak RSS is its own; ``paired`` times (a) and (b)
batch by batch alternately in one process, the fair ratio on a machine shared with other work. Prints a table and writes JSON
(default bench/results/layerwise_bench.json).

    python bench/layerwise_bench.py                       # K = 4096, 3 timed batches per mode
    python bench/layerwise_bench.py --width 16 --batches 2 --out /tmp/lw.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "kronecker", "vmap", "paired")


def resnet18(width: int = 64, n_classes: int = 10):
    """A CIFAR-style ResNet-18: 3×3 stem, four stages of two basic blocks, BatchNorm."""
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              nn.BatchNorm2d(c_out))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return self.relu(out)

    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(inplace=True)]
    c_in = width
    for i, w in enumerate(widths):
        for j in range(2):
            layers.append(Basic(c_in, w, 2 if (i > 0 and j == 0) else 1))
            c_in = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)]
    return nn.Sequential(*layers)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(mode: str, args: argparse.Namespace) -> dict:
    import torch

    from engine.grads.kronecker import KroneckerProjector
    from engine.grads.layers import Selection, select_modules
    from engine.grads.layerwise import gradient_energy, layerwise_grads
    from engine.grads.projection import ROW_BLOCK, Projector
    from engine.models.losses import cross_entropy
    from engine.models.objective import Objective

    torch.manual_seed(0)
    model = resnet18(args.width).eval()
    with torch.no_grad():  # running statistics away from their initial 0 / 1
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    n_params = sum(p.numel() for p in model.parameters())
    b = args.batch
    x = torch.randn(b, 3, 32, 32)
    y = torch.randint(0, 10, (b,))
    out: dict = {"mode": mode, "params": n_params, "batch": b, "threads": torch.get_num_threads()}

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats

    def projector() -> tuple[Selection, KroneckerProjector]:
        sel = select_modules(model)
        weights = None
        if args.split == "energy":  # calibration: per-layer gradient energy on a few images
            weights = gradient_energy(model, cross_entropy, x[: args.calibrate],
                                      y[: args.calibrate], selection=sel)
        return sel, KroneckerProjector(sel, args.k, seed=0, dtype=torch.float32, weights=weights)

    def plain_step() -> None:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()

    if mode == "plain":
        sec = timed(plain_step, args.batches)
        out.update(images_per_s=b / sec, seconds_per_batch=sec)
    elif mode == "paired":  # both rates, interleaved batch by batch: robust to a shared machine
        sel, proj = projector()

        def kron_step() -> None:
            layerwise_grads(model, cross_entropy, x, y, selection=sel, projector=proj, chunk=b)

        times: dict[str, list[float]] = {"plain": [], "kronecker": []}
        plain_step(), kron_step()  # warm-up
        for _ in range(args.batches):
            for name, fn in (("plain", plain_step), ("kronecker", kron_step)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        out.update(plain_images_per_s=b / med["plain"], kronecker_images_per_s=b / med["kronecker"],
                   images_per_s=b / med["kronecker"], ratio=med["plain"] / med["kronecker"],
                   seconds=times)
    elif mode == "kronecker":
        t = time.perf_counter()
        sel, proj = projector()
        weights = proj.weights
        for layer in sel.kronecker:
            proj.matrices(layer.name)
        proj.exact_matrix()
        setup_s = time.perf_counter() - t
        g = None

        def step() -> None:
            nonlocal g
            g = layerwise_grads(model, cross_entropy, x, y, selection=sel, projector=proj, chunk=b)

        sec = timed(step, args.batches)
        split = proj.split()
        out.update(images_per_s=b / sec, seconds_per_batch=sec, k=proj.k, setup_s=setup_s,
                   split_rule=args.split, calibration_images=args.calibrate if weights else 0,
                   layers=len(sel.kronecker), exact_params=proj.p_exact,
                   k_exact=proj.k_exact, finite=bool(torch.isfinite(g).all()),
                   split=[{k: blk[k] for k in ("name", "k", "k_out", "k_in") if k in blk}
                          for blk in split["blocks"]])
    else:
        obj = Objective(model, cross_entropy, device=torch.device("cpu"), dtype=torch.float32)
        theta = obj.flat_params()
        c = args.vmap_chunk
        sec = timed(lambda: obj.sample_grads(theta, x[:c], y[:c]), max(1, args.batches))
        proj = Projector(n_params, args.k, seed=0, dtype=torch.float32,
                         device=torch.device("cpu"), cache_bytes=0)
        g = torch.randn(c, n_params)
        slabs = 3
        t = time.perf_counter()
        for blk in range(slabs):
            g[:, blk * ROW_BLOCK : (blk + 1) * ROW_BLOCK] @ proj._generate(blk)
        per_slab = (time.perf_counter() - t) / slabs
        project_s = per_slab * proj.n_blocks
        out.update(chunk=c, grads_images_per_s=c / sec, grads_seconds_per_chunk=sec,
                   dense_project_seconds_per_chunk_extrapolated=project_s,
                   images_per_s=c / (sec + project_s),
                   dense_P_bytes=n_params * args.k * 4,
                   note=(f"P ({n_params}, {args.k}) float32 is {n_params * args.k * 4 / 1e9:.0f} GB"
                         f": regenerated slab by slab every chunk ({proj.n_blocks} slabs, "
                         f"{per_slab:.2f} s each, measured on {slabs}); gradients measured at "
                         f"chunk {c} ({c} × {n_params} floats = {c * n_params * 4 / 1e9:.2f} GB)"))
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=3, help="timed batches per mode")
    ap.add_argument("--width", type=int, default=64, help="stem width (64: ResNet-18)")
    ap.add_argument("--vmap-chunk", type=int, default=8)
    ap.add_argument("--split", choices=("energy", "params"), default="energy",
                    help="Kronecker split of K: by calibrated gradient energy or parameter count")
    ap.add_argument("--calibrate", type=int, default=16, help="images for the energy split")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=str(ROOT / "bench/results/layerwise_bench.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(one(args.child, args)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "modes", "out")]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              env=os.environ.copy())
        if proc.returncode != 0:
            rows.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1:],
                         "returncode": proc.returncode})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{mode}: done", file=sys.stderr)
    plain = next((r for r in rows if r["mode"] == "plain" and "images_per_s" in r), None)
    print(f"{'mode':<10} {'params':>10} {'images/s':>9} {'vs plain':>9} {'peak RSS MB':>12}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10} failed: {r['error']}")
            continue
        rel = r["images_per_s"] / plain["images_per_s"] if plain else float("nan")
        r["rate_vs_plain"] = rel
        note = {"plain": "forward + backward (parameter gradients), eval mode",
                "kronecker": f"K = {r.get('k')}, all {r.get('layers')} conv/linear layers + BN",
                "vmap": f"vmap grads alone {r.get('grads_images_per_s', 0):.1f} images/s; "
                        "dense projection extrapolated",
                "paired": f"interleaved in one process: plain {r.get('plain_images_per_s', 0):.2f}"
                          f" images/s, kronecker/plain = {r.get('ratio', 0):.2f}"}[r["mode"]]
        print(f"{r['mode']:<10} {r['params']:>10} {r['images_per_s']:>9.2f} {rel:>9.2f} "
              f"{r['peak_rss_mb']:>12.0f}  {note}")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
