"""FastIF benchmark: recall of the full-scan top-k and per-query speedup as the training set grows.

Training sets are digits' own training split (1,297 points at seed 0) plus augmented copies of
it (each a random training digit moved by up to one pixel each way, ``--shift``, plus Gaussian
pixel noise σ = 0.05, ``--noise``, clipped to [0, 1]); the test set is digits' clean test split.
Each size builds an ``mlp`` run (exact Hessian) in its own subprocess, then for ``--tests`` test
points times a full-scan query (``Run.top_influences``: every training point scored) against
FastIF (``engine.query.knn.fastif_top_influences``: only the kNN candidates in the model's
penultimate-layer features scored, plus with ``pool`` > 0 the training points with the largest
gradient norms). Both times include the test gradient and the H⁻¹ solve, which the two share
(reported as ``solve_ms``). Recall@k is |FastIF top-k ∩ full top-k| / k per list (helpful,
harmful), averaged over the test points; "both" is the mean of the two. "mass" is FastIF's
top-k summed score over the full scan's (1.0 when it finds points as influential, even if
they are other points, e.g. near-duplicates).

Runs use weight decay λ = 1e-3 by default (``--weight-decay``; at the engine's default 0.01 the
MLP underfits the augmented sets, about 82% training accuracy at 50k points). Networks train for
max(20, min(150, 10⁶ // n)) epochs of Adam at batch 256, then 200 L-BFGS steps; the settings
are saved in the JSON. ``--runs DIR`` keeps the built runs and reuses them on the next call (the
200k-point build took 20 minutes on two busy cores: training and the dense Hessian).

    python bench/fastif_bench.py                          # 1297 and 10000 points (~2 min idle)
    python bench/fastif_bench.py --sizes 1297,10000,50000,200000 --runs /tmp/fastif_runs

Measured (2 cores, 50 test points, top 10; bench/results/fastif.json): plain FastIF's recall
falls with n (both lists: 0.95 at 1,297 points with 1,000 candidates; 0.20 at 10k; 0.04 at
200k), because the full scan's top 10 are dominated by high-gradient-norm training points
wherever they lie in feature space. With the pool: 0.94 at 10k (pool 500), 0.96 at 50k (pool
2,000, 4.9x faster), 0.985 at 200k (pool 4,000 + 100 neighbours, 7.1x faster end to end; the
shared solve is 22 of its 28 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOISE = 0.05


def make_data(n_train: int, path: Path, *, shift: int = 1, noise: float = NOISE, seed: int = 0) -> Path:
    """Digits' training split grown to ``n_train`` with shifted (up to ``shift`` pixels each way),
    noisy copies; digits' test split."""
    from engine.data import load_data

    ds = load_data("digits", seed=0)
    x, y = np.asarray(ds.x_train, dtype=np.float64), np.asarray(ds.y_train)  # (n0, 8, 8)
    extra = max(n_train - len(x), 0)
    rng = np.random.default_rng(seed)
    src = rng.integers(0, len(x), size=extra)
    shifted = np.zeros((extra, *x.shape[1:]))
    dx, dy = rng.integers(-shift, shift + 1, size=(2, extra))
    h, w = x.shape[1:]
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift)))  # a shift moves zeros in
    for sx in range(-shift, shift + 1):
        for sy in range(-shift, shift + 1):
            sel = (dx == sx) & (dy == sy)
            shifted[sel] = padded[src[sel], shift - sy : shift - sy + h, shift - sx : shift - sx + w]
    shifted = np.clip(shifted + rng.normal(scale=noise, size=shifted.shape), 0.0, 1.0)
    np.savez(path, X_train=np.concatenate([x, shifted])[:n_train],
             y_train=np.concatenate([y, y[src]])[:n_train].astype(np.int64),
             X_test=np.asarray(ds.x_test, dtype=np.float64), y_test=np.asarray(ds.y_test, dtype=np.int64))
    return path


def _median_ms(times: list[float]) -> float:
    return 1e3 * float(np.median(times))


def train_config(n_train: int) -> dict:
    """Adam for max(20, min(150, 1e6 // n)) epochs at batch 256, then 200 L-BFGS steps."""
    return {"epochs": int(max(20, min(150, 1_000_000 // n_train))), "batch_size": 256, "lbfgs_steps": 200}


def open_or_build(n_train: int, folder: Path, *, model: str, weight_decay: float, shift: int,
                  noise: float) -> tuple[object, float]:
    """The run for one setting under ``folder`` (reused when already built) and its build seconds."""
    import engine
    from engine.config import TrainConfig

    name = f"{model}-n{n_train}-wd{weight_decay:g}-shift{shift}-noise{noise:g}"
    out = folder / name
    if out.exists():
        run = engine.open_run(out)
        return run, float(run.info.timings["total_s"])
    data = make_data(n_train, folder / f"data-n{n_train}-shift{shift}-noise{noise:g}.npz",
                     shift=shift, noise=noise)
    t = time.perf_counter()
    run = engine.build(str(data), model, out, ihvp="exact", weight_decay=weight_decay,
                       train=TrainConfig(**train_config(n_train)), progress=False)
    return run, time.perf_counter() - t


def one(n_train: int, *, model: str, tests: int, top: int, candidates: list[int], pools: list[int],
        weight_decay: float, shift: int, noise: float, runs: str | None) -> dict:
    import torch

    from engine.query.knn import faiss_available, fastif_top_influences, run_index

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(runs) if runs else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        run, build_s = open_or_build(n_train, folder, model=model, weight_decay=weight_decay,
                                     shift=shift, noise=noise)
        t = time.perf_counter()
        index = run_index(run)  # train features + FAISS index, once per run
        index_s = time.perf_counter() - t
        ids = np.arange(min(tests, run.n_test))
        solver = run.solver()

        def full(i: int) -> tuple[dict, float]:
            t = time.perf_counter()
            res = run.queries.top_influences(run.queries.test_gradients(np.array([i])), top=top).lists(
                0, run.dataset.y_train)
            return res, time.perf_counter() - t

        full(0)  # warm-up
        full_res, full_t, solve_t = [], [], []
        for i in ids:
            res, dt = full(int(i))
            full_res.append(res)
            full_t.append(dt)
            t = time.perf_counter()
            solver.solve(run.queries.test_gradients(np.array([i])).T.contiguous())
            solve_t.append(time.perf_counter() - t)
        rows = []
        for c, pool in ((c, pool) for pool in pools for c in candidates):
            fastif_top_influences(run, 0, top=top, candidates=c, pool=pool)  # warm-up
            fast = [fastif_top_influences(run, int(i), top=top, candidates=c, pool=pool)[0] for i in ids]
            recall, mass = {}, {}
            for side in ("helpful", "harmful"):
                recall[side] = float(np.mean([
                    len({r["train_id"] for r in f[side]} & {r["train_id"] for r in q[side]}) / top
                    for f, q in zip(full_res, fast)]))
                # the share of the full top-k's summed score that FastIF's top-k holds
                mass[side] = float(np.mean([sum(r["score"] for r in q[side]) / sum(r["score"] for r in f[side])
                                            for f, q in zip(full_res, fast)]))
            fast_ms = _median_ms([q["seconds"] for q in fast])
            rows.append({"candidates": c, "pool": pool,
                         "scored": float(np.mean([q["candidates"] for q in fast])),
                         "recall_helpful": recall["helpful"], "recall_harmful": recall["harmful"],
                         "recall": (recall["helpful"] + recall["harmful"]) / 2,
                         "mass_helpful": mass["helpful"], "mass_harmful": mass["harmful"],
                         "fastif_ms": fast_ms, "speedup": _median_ms(full_t) / fast_ms})
        return {
            "n_train": run.n_train, "n_test_queried": len(ids), "model": model, "shift": shift,
            "noise": noise,
            "n_params": run.info.model.n_params, "feature_dim": index.dim,
            "test_accuracy": run.info.training["test_accuracy"],
            "grad_norm": run.info.training["grad_norm"],
            "weight_decay": weight_decay, "train": train_config(n_train),
            "train_accuracy": run.info.training["train_accuracy"],
            "build_s": build_s, "build_timings": run.info.timings, "index_build_s": index_s,
            "knn_backend": index.backend, "faiss": faiss_available(),
            "full_ms": _median_ms(full_t), "solve_ms": _median_ms(solve_t),
            "store_mb": run.store.resident.nbytes / 2**20,
            "fastif": rows, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def _table(results: list[dict]) -> str:
    head = (f"{'n_train':>8} {'full ms':>8} {'solve ms':>8} {'index s':>8} {'cand':>6} {'pool':>5} "
            f"{'fastif ms':>9} {'speedup':>8} {'R@k help':>8} {'R@k harm':>8} {'R@k both':>8} "
            f"{'mass help':>9} {'mass harm':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        for i, f in enumerate(r["fastif"]):
            left = (f"{r['n_train']:>8} {r['full_ms']:>8.1f} {r['solve_ms']:>8.1f} "
                    f"{r['index_build_s']:>8.2f}") if i == 0 else " " * 35
            lines.append(f"{left} {f['candidates']:>6} {f['pool']:>5} {f['fastif_ms']:>9.1f} "
                         f"{f['speedup']:>7.1f}x {f['recall_helpful']:>8.3f} {f['recall_harmful']:>8.3f} "
                         f"{f['recall']:>8.3f} {f['mass_helpful']:>9.3f} {f['mass_harmful']:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1297,10000", help="training-set sizes, comma-separated")
    p.add_argument("--candidates", default="100,500,1000,2000", help="FastIF candidate counts")
    p.add_argument("--pools", default="0,500,2000,4000", help="gradient-norm pool sizes (0: plain FastIF)")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="λ of the runs")
    p.add_argument("--runs", help="keep built runs in this folder and reuse them (default: temporary)")
    p.add_argument("--shift", type=int, default=1, help="max pixel shift of the augmented copies")
    p.add_argument("--noise", type=float, default=NOISE, help="pixel noise σ of the augmented copies")
    p.add_argument("--model", default="mlp", choices=["logreg", "mlp", "cnn"])
    p.add_argument("--tests", type=int, default=50, help="test points queried per size")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fastif.json"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON on stdout
    args = p.parse_args()
    cands = [int(c) for c in args.candidates.split(",")]
    pools = [int(c) for c in args.pools.split(",")]
    if args.one is not None:
        print(json.dumps(one(args.one, model=args.model, tests=args.tests, top=args.top,
                             candidates=cands, pools=pools, weight_decay=args.weight_decay,
                             shift=args.shift, noise=args.noise, runs=args.runs)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--model", args.model,
                               "--candidates", args.candidates, "--pools", args.pools,
                               "--shift", str(args.shift), "--noise", str(args.noise),
                               "--weight-decay", str(args.weight_decay),
                               *(["--runs", args.runs] if args.runs else []),
                               "--tests", str(args.tests), "--top", str(args.top)],
                              cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"size {n} failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"n_train={n}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        # written after every size, so a long sweep keeps what it has measured
        out.write_text(json.dumps({"benchmark": "fastif", "top": args.top, "shift": args.shift,
                                   "noise": args.noise, "weight_decay": args.weight_decay, "tests": args.tests,
                                   "machine": {"python": platform.python_version(),
                                               "platform": platform.platform(),
                                               "cpus": os.cpu_count()},
                                   "results": results}, indent=2))
    print(_table(results))
    print(f"wrote {out}", file=sys.stderr)

if __name__ == "__main__":
    main()
