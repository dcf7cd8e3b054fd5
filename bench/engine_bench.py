"""Engine benchmark: build time, query latency, solver agreement and peak memory on digits.

Each model runs in its own subprocess so peak memory (max RSS, and CUDA peak on a GPU) is its
own. Prints a table and writes JSON (default bench/results/engine.json).

    python bench/engine_bench.py                      # logreg, mlp, cnn on the CPU (and cuda if present)
    python bench/engine_bench.py --models logreg --devices cpu --out /tmp/b.json
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


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def one(model: str, device: str, loo_tests: int, lissa_tests: int) -> dict:
    import torch

    import engine
    from engine.validate import leave_one_out

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = engine.build("digits", model, Path(tmp) / "run", device=device, progress=False)
        build_s = time.perf_counter() - t
        info = run.info
        one_query = _median_time(lambda: run.explain(7, top=10), repeats=20)
        all_scores = _median_time(lambda: run.scores(), repeats=3)
        exact = run.scores()
        agreement = {}
        for method, n_tests in (("cg", run.n_test), ("lissa", lissa_tests)):
            t = time.perf_counter()
            s = run.scores(list(range(n_tests)), ihvp=method)
            agreement[method] = {
                "tests": n_tests,
                "seconds": time.perf_counter() - t,
                "pearson_vs_exact": float(np.corrcoef(s.ravel(), exact[:, :n_tests].ravel())[0, 1]),
                "settings": run.ihvp_report(method)["settings"],
                "diagnostics": run.explain(0, ihvp=method)["ihvp"]["diagnostics"],
            }
        loo = leave_one_out(run, test_index=list(range(loo_tests)), top=8)
        self_t = _median_time(run.self_influence, repeats=3)
        out = {
            "model": model, "device": str(run.device), "n_params": info.model.n_params,
            "n_train": run.n_train, "n_test": run.n_test,
            "test_accuracy": info.training["test_accuracy"],
            "grad_norm": info.training["grad_norm"],
            "build_s": build_s, "build_timings": info.timings,
            "query_one_ms": 1e3 * one_query,
            "scores_all_s": all_scores,
            "self_influence_s": self_t,
            "solvers": agreement,
            "loo": {"pairs": len(loo["pairs"]), "pearson": loo["pearson"],
                    "spearman": loo["spearman"], "ground_truth": loo["ground_truth"],
                    "seconds": loo["seconds"]},
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if run.device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def cli_scores_seconds() -> float:
    """End to end ``influence scores`` (process start included) on a digits logreg run."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        exe = [sys.executable, "-m", "app.cli"]
        subprocess.run([*exe, "build", "--data", "digits", "--model", "logreg", "--out", str(run),
                        "--quiet"], check=True, cwd=ROOT, capture_output=True)
        t = time.perf_counter()
        subprocess.run([*exe, "scores", "--run", str(run), "--out", str(Path(tmp) / "s.npy")],
                       check=True, cwd=ROOT, capture_output=True)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["logreg", "mlp", "cnn"])
    ap.add_argument("--devices", nargs="+", default=None)
    ap.add_argument("--loo-tests", type=int, default=5)
    ap.add_argument("--lissa-tests", type=int, default=50,
                    help="test points solved by LiSSA (cost grows with depth × batch × tests)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], args.loo_tests, args.lissa_tests)))
        return
    import torch

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for model in args.models:
            proc = subprocess.run([sys.executable, __file__, "--one", model, device,
                                   "--loo-tests", str(args.loo_tests),
                                   "--lissa-tests", str(args.lissa_tests)],
                                  capture_output=True, text=True, cwd=ROOT, check=False,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                raise SystemExit(f"benchmark of {model} on {device} failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done: {model} on {device}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    cli_s = cli_scores_seconds()
    header = (f"{'model':<7} {'device':<6} {'params':>7} {'acc':>6} {'build s':>8} {'1 query ms':>10} "
              f"{'500 tests s':>11} {'cg r':>9} {'cg s':>6} {'lissa r':>8} {'lissa s/pt':>10} "
              f"{'LOO r':>6} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<7} {r['device']:<6} {r['n_params']:>7} {r['test_accuracy']:>6.3f} "
              f"{r['build_s']:>8.2f} {r['query_one_ms']:>10.2f} {r['scores_all_s']:>11.3f} "
              f"{r['solvers']['cg']['pearson_vs_exact']:>9.6f} {r['solvers']['cg']['seconds']:>6.2f} "
              f"{r['solvers']['lissa']['pearson_vs_exact']:>8.4f} "
              f"{r['solvers']['lissa']['seconds'] / r['solvers']['lissa']['tests']:>10.3f} "
              f"{r['loo']['pearson']:>6.3f} {r['peak_rss_mb']:>7.0f}")
    print(f"\ninfluence scores, digits logreg exact, 1297 x 500, end to end (CLI process): {cli_s:.2f} s")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "torch": torch.__version__},
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cli_scores_logreg_s": cli_s, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
