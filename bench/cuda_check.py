"""Correctness of the engine's CUDA paths against CPU float64 references (torch + numpy only).

    python bench/cuda_check.py            # on a machine with a GPU; exits 1 if a check fails

Each check prints one line (PASS/FAIL, the measured error) and the whole lot is written to
bench/results/cuda_check.json. The same checks run under pytest as ``tests/engine/test_cuda.py``
(``pytest -m cuda``), skipped where there is no CUDA device. They need no data set beyond a
synthetic one made here, so a bare GPU machine with torch, numpy and tqdm can run them.

Checks: the resident store's float16/bfloat16 block products (``mm(out_dtype=float32)`` on
tensor cores, or the upcast fallback) and its helpful/harmful top-k; an exact logistic-regression
run built on the GPU in float64 and in float32; a projected float16 run built on the CPU and
opened on the GPU; concurrent queries on the GPU (the module pool); a small MLP built on the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine
from engine.query.topk import helpful_harmful
from engine.store import resident
from engine.store.resident import ResidentStore
from tests.small_data import write_blobs

OUT = ROOT / "bench" / "results" / "cuda_check.json"
TOP = 10


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got − want| / max |want|."""
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


def check_products(device: torch.device) -> dict[str, Any]:
    """float16/bfloat16 block products on the device against float64 on the CPU."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(20_000, 256, generator=gen, dtype=torch.float64)
    scales = torch.logspace(-6, 6, 8, dtype=torch.float64)  # query columns from 1e-6 to 1e6
    s = torch.randn(256, 8, generator=gen, dtype=torch.float64) * scales
    out: dict[str, Any] = {}
    for name, dtype, tol in (("float16", torch.float16, 2e-3), ("bfloat16", torch.bfloat16, 2e-2)):
        rows = g.to(dtype)
        want = rows.double() @ s  # the store's own values, multiplied exactly
        store = ResidentStore(rows.to(device), compute_dtype=torch.float32)
        got = torch.cat([b for _, b in store.products(s.to(device), block=7_000)]).double().cpu()
        got_t = torch.cat([b for _, b in store.products_t(s.T.contiguous().to(device), block=7_000)],
                          dim=1).T.double().cpu()
        errs = [max(rel_err(x[:, j].numpy(), want[:, j].numpy()) for j in range(s.shape[1]))
                for x in (got, got_t)]
        out[name] = {"max_rel_err": max(errs), "ok": max(errs) <= tol}
    out["mm_out_dtype"] = resident._MM_OUT_DTYPE.get(device.type)  # None: never needed (CPU upcasts)
    out["ok"] = all(v["ok"] for k, v in out.items() if isinstance(v, dict))
    return out


def check_topk(device: torch.device) -> dict[str, Any]:
    """Helpful/harmful top-k streamed over device blocks equals the CPU's over a float64 store."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(50_000, 64, generator=gen, dtype=torch.float64)
    s = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    cpu = helpful_harmful(ResidentStore(g, compute_dtype=torch.float64).products_t(s.T.contiguous()), TOP)
    dev_store = ResidentStore(g.to(device), compute_dtype=torch.float64)
    dev = helpful_harmful(dev_store.products_t(s.T.contiguous().to(device), block=9_000), TOP)
    same = all(torch.equal(a[1].cpu(), b[1]) for a, b in zip(dev, cpu))
    err = max(float((a[0].cpu() - b[0]).abs().max()) for a, b in zip(dev, cpu))
    return {"ids_equal": same, "max_abs_err": err, "ok": same and err < 1e-9}


def check_exact_run(device: torch.device, tmp: Path, data: Path) -> dict[str, Any]:
    """Exact logreg built on the device (float64 and float32) against the CPU float64 build."""
    ref = engine.build(str(data), "logreg", tmp / "cpu", device="cpu", progress=False)
    want = ref.scores()
    out: dict[str, Any] = {}
    for dtype, tol in (("float64", 1e-7), ("float32", 2e-3)):
        run = engine.build(str(data), "logreg", tmp / f"dev-{dtype}", device=str(device),
                           dtype=dtype, progress=False)
        got = run.scores()
        helpful = np.mean([len(set(np.argsort(got[:, j])[:TOP]) & set(np.argsort(want[:, j])[:TOP])) / TOP
                           for j in range(want.shape[1])])
        out[dtype] = {"max_rel_err": rel_err(got, want), "helpful_top10_overlap": float(helpful),
                      "ok": rel_err(got, want) <= tol}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def check_projected_opened_on_device(device: torch.device, tmp: Path, data: Path) -> dict[str, Any]:
    """A float16 projected run built on the CPU, opened on the device: same P, same scores."""
    built = engine.build(str(data), "logreg", tmp / "proj16", device="cpu", ihvp="projected",
                         project=32, store_dtype="float16", progress=False)
    want = built.scores()
    run = engine.open_run(built.path, device=str(device))
    got = run.scores()
    err = rel_err(got, want)
    top = run.queries.top_influences(run.queries.test_gradients(np.arange(4)), top=TOP)
    ids_ok = all(top.helpful_ids[:, j].tolist() == np.argsort(want[:, j])[:TOP].tolist()
                 for j in range(4))
    return {"resident_dtype": str(run.store.resident.dtype), "max_rel_err": err, "helpful_ids_equal": ids_ok,
            "ok": err <= 2e-3 and run.store.resident.data.device.type == device.type}


def check_concurrent_queries(device: torch.device, tmp: Path, data: Path) -> dict[str, Any]:
    """Eight threads querying one device run get the serial answers (the per-thread module pool)."""
    run = engine.build(str(data), "mlp", tmp / "mlp-threads", device=str(device), ihvp="cg",
                       progress=False)
    def top(j: int) -> list[int]:
        found = run.queries.top_influences(run.queries.test_gradients([j]), top=TOP)
        return found.helpful_ids[:, 0].tolist() + found.harmful_ids[:, 0].tolist()

    serial = {j: top(j) for j in range(16)}
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for j in range(offset, 16, 2):
            if top(j) != serial[j]:
                wrong.append(j)

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"queries": 64, "wrong": len(wrong), "ok": not wrong}


def check_mlp_run(device: torch.device, tmp: Path, data: Path) -> dict[str, Any]:
    """A float64 MLP with CG built on the device against the same build on the CPU."""
    want = engine.build(str(data), "mlp", tmp / "mlp-cpu", device="cpu", ihvp="cg",
                        dtype="float64", progress=False).scores(np.arange(10))
    got = engine.build(str(data), "mlp", tmp / "mlp-dev", device=str(device), ihvp="cg",
                       dtype="float64", progress=False).scores(np.arange(10))
    pearson = float(np.corrcoef(got.ravel(), want.ravel())[0, 1])
    return {"pearson": pearson, "max_rel_err": rel_err(got, want), "ok": pearson >= 0.999}


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "products": check_products,
    "topk": check_topk,
    "exact_run": check_exact_run,
    "projected_opened_on_device": check_projected_opened_on_device,
    "concurrent_queries": check_concurrent_queries,
    "mlp_run": check_mlp_run,
}
NEEDS_DATA = {"exact_run", "projected_opened_on_device", "concurrent_queries", "mlp_run"}


def run_check(name: str, device: torch.device, tmp: Path) -> dict[str, Any]:
    """One check by name; data-backed checks get their own folder and the blobs data set."""
    if name not in NEEDS_DATA:
        return CHECKS[name](device)
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    data = write_blobs(folder / "blobs.npz", n_train=600, n_test=60, d=12, c=4)
    return CHECKS[name](device, folder, data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="*", choices=sorted(CHECKS), help="run only these checks")
    ap.add_argument("--json", type=Path, default=OUT)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here", file=sys.stderr)
        return 2
    results: dict[str, Any] = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                          else "cpu"), "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only or CHECKS:
            try:
                res = run_check(name, device, Path(tmp))
            except Exception as exc:  # noqa: BLE001 (a crash is a failed check, reported with the others)
                res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            results["checks"][name] = res
            figures = {k: v for k, v in res.items() if k != "ok"}
            print(f"{'PASS' if res['ok'] else 'FAIL'} {name}: {json.dumps(figures)}", flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results["checks"].items() if not v["ok"]]
    print(f"{len(results['checks']) - len(failed)}/{len(results['checks'])} passed on {results['device']}"
          f"; wrote {a.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
