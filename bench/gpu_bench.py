"""Query and precompute speed at synthetic scale: a random N×K store in float16/bfloat16 on the
device, queried through the engine's own code (ResidentStore products, helpful_harmful top-k,
Projector, ProjectedSolver, Objective per-sample gradients of a ~0.42M-parameter CNN).

    .venv/bin/python bench/gpu_bench.py                  # CPU: --n 200000 by default, ~1-2 min
    .venv/bin/python bench/gpu_bench.py --n 1000000      # GPU (the default there is 1,000,000)

Measures: device-to-device copy bandwidth; one query end to end (test gradient + projection +
K×K solve + one pass over the store + helpful/harmful top-k), plain and, on CUDA, replayed from a
captured CUDA graph; batches of 1/64/512 queries (solve + pass + top-k) in queries/s and the
top-k's share over the bare product; the product's time against the bandwidth limit (store
bytes / copy bandwidth); precompute images/s (per-sample gradients + projection to K).
Prints a table and writes bench/results/gpu_bench.json with the device name.

Targets on an H200 (1M × 2048 float16): one query end to end < 1.5 ms; batches of 512 > 50,000
queries/s with top-k adding < 25% to the product; precompute ≥ 50,000 images/s at K = 2048.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.grads.projection import Projector
from engine.ihvp.projected import ProjectedSolver
from engine.models.losses import make_loss
from engine.models.objective import Objective
from engine.models.zoo import ChannelsFirst
from engine.query.topk import helpful_harmful
from engine.store.resident import ResidentStore

OUT = ROOT / "bench" / "results" / "gpu_bench.json"
IMAGE = (32, 32, 3)  # CIFAR-sized, channels last like the engine's data
TOP = 10
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def bench_cnn(n_classes: int = 10) -> nn.Module:
    """A 422,698-parameter CNN for 32×32×3 images (tanh and average pooling, like the zoo's)."""
    return nn.Sequential(
        ChannelsFirst(),
        nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),  # (32, 16, 16)
        nn.Conv2d(32, 64, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),  # (64, 8, 8)
        nn.Conv2d(64, 128, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),  # (128, 4, 4)
        nn.Flatten(), nn.Linear(2048, 160), nn.Tanh(), nn.Linear(160, n_classes),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after ``warmup``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def random_store(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n, k) N(0, 1/k) rows in ``dtype`` on ``device``, generated in chunks."""
    data = torch.empty(n, k, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    step = max(1, (1 << 26) // k)
    for s in range(0, n, step):
        rows = min(step, n - s)
        data[s : s + rows] = (torch.randn(rows, k, generator=gen, device=device) / k**0.5).to(dtype)
    return data


def spd_curvature(k: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5
    return (a @ a.T + torch.eye(k, dtype=torch.float64)).to(device, torch.float32)  # (K, K)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=None, help="store rows (1,000,000 on CUDA, 200,000 on CPU)")
    p.add_argument("--k", type=int, default=None,
                   help="projected dimension (2048 on CUDA; 512 on CPU, where generating the "
                        "0.42M × 2048 projection alone takes about a minute)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (20 CUDA, 3 CPU)")
    p.add_argument("--precompute-batch", type=int, default=None, help="images per gradient block")
    p.add_argument("--compare-uncached", action="store_true",
                   help="also time precompute with the projection regenerated per block")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)

    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if a.device == "auto" else a.device))
    cuda = device.type == "cuda"
    n = a.n or (1_000_000 if cuda else 200_000)
    k = a.k or (2048 if cuda else 512)
    repeats = a.repeats or (20 if cuda else 3)
    dtype = DTYPES[a.dtype]
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    res: dict[str, Any] = {"device": str(device), "device_name": name, "n": n, "k": k,
                           "store_dtype": a.dtype, "torch": torch.__version__, "top": TOP}

    # ---- the store and copy bandwidth
    store = ResidentStore(random_store(n, k, dtype, device), compute_dtype=torch.float32)
    gb = store.nbytes / 1e9
    buf = torch.empty_like(store.data)
    t_copy = timed(lambda: buf.copy_(store.data), device, repeats=repeats)
    bandwidth = 2 * store.nbytes / t_copy  # bytes read + written per second
    res.update(store_gb=gb, copy_s=t_copy, copy_gbps=bandwidth / 1e9,
               product_bound_s=store.nbytes / bandwidth)

    # ---- the query path's parts
    obj = Objective(bench_cnn(), make_loss("cnn", svm_temperature=0.01), device=device, dtype=torch.float32)
    theta = obj.flat_params()
    res["cnn_params"] = obj.n_params
    proj_dtype = dtype if cuda else torch.float32
    t = time.perf_counter()
    projector = Projector(obj.n_params, k, seed=0, dtype=proj_dtype, device=device,
                          cache_bytes=obj.n_params * k * 4 + 1)
    projector.matrix()
    res["projection_setup_s"] = time.perf_counter() - t
    solver = ProjectedSolver(spd_curvature(k, device))
    gen = torch.Generator(device="cpu").manual_seed(2)
    x1 = torch.rand(1, *IMAGE, generator=gen).to(device)
    y1 = torch.tensor([3], device=device)

    def query() -> tuple[Any, Any]:
        g = projector.project(obj.sample_grads(theta, x1, y1)).float()  # (1, K)
        s = solver.solve(g.T.contiguous())  # (K, 1)
        return helpful_harmful(store.products_t(s.T.contiguous()), TOP)

    res["query_s"] = timed(query, device, repeats=repeats, warmup=2)
    res["query_graph_s"] = None
    if cuda:
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    query()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                query()
            res["query_graph_s"] = timed(graph.replay, device, repeats=repeats, warmup=2)
        except Exception as exc:  # noqa: BLE001 (capture is optional: report why it did not work)
            res["query_graph_error"] = f"{type(exc).__name__}: {exc}"[:300]

    # ---- batches of queries: solve + one pass + top-k, against the bare product
    res["batches"] = []
    for m in a.batches:
        g = torch.randn(m, k, generator=gen).to(device)

        def with_topk(g: torch.Tensor = g) -> Any:
            s = solver.solve(g.T.contiguous())
            return helpful_harmful(store.products_t(s.T.contiguous()), TOP)

        s_fixed = solver.solve(g.T.contiguous()).T.contiguous()

        def bare(s_t: torch.Tensor = s_fixed) -> None:
            for _ in store.products_t(s_t):
                pass

        t_topk = timed(with_topk, device, repeats=repeats)
        t_bare = timed(bare, device, repeats=repeats)
        res["batches"].append({"m": m, "s": t_topk, "product_s": t_bare, "queries_per_s": m / t_topk,
                               "topk_share": (t_topk - t_bare) / t_bare})
    res["product_1_s"] = res["batches"][0]["product_s"] if a.batches[0] == 1 else None

    # ---- precompute: per-sample gradients + projection
    pk, pre = k, projector
    batch = a.precompute_batch or (512 if cuda else 64)
    xb = torch.rand(batch, *IMAGE, generator=gen).to(device)
    yb = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def precompute(proj: Projector = pre) -> torch.Tensor:
        return proj.project(obj.sample_grads(theta, xb, yb))  # (b, K)

    t_pre = timed(precompute, device, repeats=max(2, repeats // 4))
    res.update(precompute_k=pk, precompute_batch=batch, precompute_images_per_s=batch / t_pre)
    if a.compare_uncached:
        streamed = Projector(obj.n_params, pk, seed=0, dtype=proj_dtype, device=device, cache_bytes=0)
        t_old = timed(lambda: precompute(streamed), device, repeats=1, warmup=0)
        res["precompute_uncached_images_per_s"] = batch / t_old
    report(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
    return res


def report(r: dict[str, Any]) -> None:
    ms = 1e3
    rows = [
        ("device", f"{r['device_name']} ({r['device']})"),
        ("store", f"{r['n']:,} × {r['k']} {r['store_dtype']} = {r['store_gb']:.2f} GB"),
        ("copy bandwidth", f"{r['copy_gbps']:.1f} GB/s (read + write)"),
        ("product bound", f"{r['product_bound_s'] * ms:.3f} ms (store bytes / bandwidth)"),
        ("1 query end to end", f"{r['query_s'] * ms:.3f} ms"),
        ("1 query, CUDA graph", (f"{r['query_graph_s'] * ms:.3f} ms" if r.get("query_graph_s")
                                 else r.get("query_graph_error", "n/a (no CUDA)"))),
    ]
    if r.get("product_1_s"):
        rows.append(("product, 1 query", (f"{r['product_1_s'] * ms:.3f} ms = "
                                          f"{r['product_1_s'] / r['product_bound_s']:.2f} × bound")))
    for b in r["batches"]:
        rows.append((f"batch {b['m']}", (f"{b['s'] * ms:.2f} ms, {b['queries_per_s']:,.0f} queries/s, "
                                         f"top-k +{100 * b['topk_share']:.1f}% over the product "
                                         f"({b['product_s'] * ms:.2f} ms)")))
    rows.append(("precompute", (f"{r['precompute_images_per_s']:,.0f} images/s (CNN {r['cnn_params']:,} "
                                f"params, K = {r['precompute_k']}, batch {r['precompute_batch']})")))
    if "precompute_uncached_images_per_s" in r:
        rows.append(("precompute, P regenerated", f"{r['precompute_uncached_images_per_s']:,.1f} images/s"))
    rows.append(("projection setup", f"{r['projection_setup_s']:.1f} s (P generated once, cached)"))
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")


if __name__ == "__main__":
    main()
