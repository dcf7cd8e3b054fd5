"""Curvature benchmark: EK-FAC factor fit and solve per layer shape of a CIFAR-style ResNet-18, in
the full space and in a 64×64 Kronecker-projected space, and the Fisher of a store (n × K).

Inputs are synthetic (random a, δ in float32; the timings do not depend on the values). For each
layer shape (d_out, d_in) at its number of positions s per image (3×3 convolutions on 32×32
inputs: 1,024 positions at stage 1 down to 16 at stage 4): the covariance pass and the eigenvalue
correction pass in images/s (products in ``--dtype``, sums in float64), the two eigendecompositions
(float64), and an EK-FAC solve of 1 and 100 store-space columns. "net" extrapolates to the whole
network (each shape × its count in ResNet-18, downsampling 1×1 convolutions left out) and
``--images`` training images: the fit in seconds (two passes + eigh) and the solve of 100 columns.
The Fisher rows: ``FisherSolver`` on ``--fisher-n`` random float32 rows of K columns (float64 Gram,
Cholesky, spectrum), and a solve of 100 columns.

    python bench/curvature_bench.py                      # CPU, ~15 min on 2 busy cores
    python bench/curvature_bench.py --device cuda --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from engine.ihvp.ekfac import CovarianceAccumulator, LambdaAccumulator, eigenbasis, fit_ekfac, layer_layout
from engine.ihvp.ekfac_solver import EKFACSolver
from engine.ihvp.fisher import FisherSolver

ROOT = Path(__file__).resolve().parents[1]

# (name, d_out, d_in, positions per image, layers of this shape in ResNet-18 for 32×32 images)
RESNET18 = [("conv1", 64, 27, 1024, 1), ("layer1", 64, 576, 1024, 4), ("layer2.0", 128, 576, 256, 1),
            ("layer2", 128, 1152, 256, 3), ("layer3.0", 256, 1152, 64, 1), ("layer3", 256, 2304, 64, 3),
            ("layer4.0", 512, 2304, 16, 1), ("layer4", 512, 4608, 16, 3), ("fc", 10, 512, 1, 1)]
PROJECTED = 64  # k_out = min(d_out, 64), k_in = min(d_in, 64)
SOLVE_REPEAT_ELEMENTS = 1 << 26  # larger solves (d × m) are timed once


def _timed(fn, device: torch.device, *, repeat: int = 1) -> tuple[float, object]:
    """The fastest of ``repeat`` calls (seconds) and the last call's result."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_layer(d_out: int, d_in: int, s: int, *, batch: int, dtype: torch.dtype,
                device: torch.device, repeat: int) -> dict[str, float]:
    """Seconds and images/s of each EK-FAC stage for one layer shape (the fastest of ``repeat``
    runs of each pass and solve; the eigendecompositions once)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(batch, s, d_in, generator=g).to(device)  # (b, s, d_in) float32
    delta = torch.randn(batch, s, d_out, generator=g).to(device)  # (b, s, d_out)
    layout = layer_layout([("layer", d_out, d_in)])
    cov = CovarianceAccumulator(layout, dtype=dtype, device=device)
    t_cov, _ = _timed(lambda: cov.update("layer", a, delta), device, repeat=repeat)
    a_cov, s_cov = cov.covariances("layer")
    t_eig, ((_, q_a), (_, q_s)) = _timed(lambda: (eigenbasis(a_cov), eigenbasis(s_cov)), device)
    lam = LambdaAccumulator({"layer": (q_a, q_s)}, dtype=dtype, device=device)
    t_lam, _ = _timed(lambda: lam.update("layer", a, delta), device, repeat=repeat)
    factors = fit_ekfac(lambda: [("layer", a[:2], delta[:2])], layout, dtype=dtype, device=device)
    solver = EKFACSolver(factors, damping=1e-3, dtype=torch.float32, device=device)
    out = {"cov_img_s": batch / t_cov, "eigh_s": t_eig, "lambda_img_s": batch / t_lam}
    for m in (1, 100):
        b = torch.randn(d_out * d_in, m, generator=g).to(device)  # (d, m)
        reps = repeat if d_out * d_in * m <= SOLVE_REPEAT_ELEMENTS else 1  # a full-space 100 once
        out[f"solve{m}_ms"] = 1e3 * _timed(lambda b=b: solver.solve(b), device, repeat=reps)[0]
    return out


def bench_fisher(n: int, k: int, *, device: torch.device, repeat: int) -> dict[str, float]:
    rows = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).to(device)  # (n, K) float32
    t_build, solver = _timed(lambda: FisherSolver(rows, damping=1e-3, device=device), device)
    t_spec, settings = _timed(solver.settings, device)
    b = torch.randn(k, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    t_solve, _ = _timed(lambda: solver.solve(b), device, repeat=repeat)
    return {"n": n, "k": k, "build_s": t_build, "spectrum_s": t_spec, "solve100_ms": 1e3 * t_solve,
            "spectrum": settings["spectrum"], "condition_number": settings["condition_number"],
            "residual": solver.diagnostics["max_relative_residual"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                        help="dtype of the factor products (sums are float64 either way)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each pass (fastest kept)")
    parser.add_argument("--images", type=int, default=5000, help="training images for the 'net' row")
    parser.add_argument("--fisher-n", type=int, default=5000)
    parser.add_argument("--fisher-k", default="1024,2048,4096")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); on a shared machine 1 avoids "
                             "the stalls of a 2-thread pool whose second core is busy")
    parser.add_argument("--spaces", default="full,projected")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "curvature_bench.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    machine = {"platform": platform.platform(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": str(device),
               "load_average_start": os.getloadavg()[0],
               "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    results: dict[str, object] = {
        "machine": machine,
        "settings": {"dtype": args.dtype, "batch": args.batch, "repeat": args.repeat, "images": args.images,
                     "solve_dtype": "float32"},
    }
    header = (f"{'space':9} {'layer':9} {'d_out×d_in':>11} {'s':>5} {'cov img/s':>10} {'eigh s':>7} "
              f"{'Λ img/s':>9} {'solve1 ms':>10} {'solve100 ms':>12}")
    print(header)
    for space in args.spaces.split(","):
        rows, fit_s, solve_ms = [], 0.0, 0.0
        for name, d_out, d_in, s, count in RESNET18:
            if space == "projected":
                d_out, d_in = min(d_out, PROJECTED), min(d_in, PROJECTED)
            r = bench_layer(d_out, d_in, s, batch=args.batch, dtype=dtype, device=device,
                            repeat=args.repeat)
            r.update(name=name, d_out=d_out, d_in=d_in, positions=s, count=count)
            rows.append(r)
            fit_s += count * (args.images / r["cov_img_s"] + r["eigh_s"] + args.images / r["lambda_img_s"])
            solve_ms += count * r["solve100_ms"]
            print(f"{space:9} {name:9} {f'{d_out}×{d_in}':>11} {s:5d} {r['cov_img_s']:10.0f} "
                  f"{r['eigh_s']:7.2f} {r['lambda_img_s']:9.0f} {r['solve1_ms']:10.2f} "
                  f"{r['solve100_ms']:12.1f}", flush=True)
        print(f"{space:9} {'net':9} fit of {args.images} images {fit_s:.0f} s, solve of 100 columns "
              f"{solve_ms / 1e3:.2f} s", flush=True)
        results[space] = {"layers": rows, "net_fit_s": fit_s, "net_solve100_s": solve_ms / 1e3}
    print(f"\n{'fisher n':>9} {'K':>6} {'build s':>8} {'spectrum s':>11} {'solve100 ms':>12} {'residual':>9}")
    fisher = []
    for k in (int(x) for x in args.fisher_k.split(",")):
        r = bench_fisher(args.fisher_n, k, device=device, repeat=args.repeat)
        fisher.append(r)
        print(f"{r['n']:9d} {k:6d} {r['build_s']:8.2f} {r['spectrum_s']:11.2f} {r['solve100_ms']:12.1f} "
              f"{r['residual']:9.1e}", flush=True)
    results["fisher"] = fisher
    machine["load_average_end"] = os.getloadavg()[0]  # other jobs share the CPUs
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
