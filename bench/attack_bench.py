"""Training-set attack benchmark: how often bounded changes to a few training images flip a
correctly classified test prediction once the model is retrained (Koh & Liang 2017, §5.2).

For each setting (images perturbed, bound ε on |δ| per input value), the attack runs on the same
seeded sample of correctly classified test points of a digits run; success means the retrained
model predicts another class. Prints a table and writes JSON (default bench/results/attack.json).

    python bench/attack_bench.py                                   # logreg, 10 test points
    python bench/attack_bench.py --tests 20 --settings 10:0.5 30:0.5 30:0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    import engine
    from engine.attack import attack

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--tests", type=int, default=10, help="test points to attack per setting")
    ap.add_argument("--settings", nargs="+", default=["10:0.5", "30:0.5", "30:0.25", "60:0.5"],
                    help="POINTS:EPSILON pairs")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attack.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = engine.build("digits", args.model, Path(tmp) / "run", progress=False)
        proba = run.predictions("test")
        correct = np.flatnonzero(proba.argmax(axis=1) == run.dataset.y_test)
        tests = np.random.default_rng(args.seed).choice(correct, size=args.tests, replace=False)
        rows = []
        print(f"{'points':>6} {'epsilon':>7} {'flipped':>9} {'rate':>6} {'mean iters':>10} {'s/attack':>9}")
        for setting in args.settings:
            points, eps = int(setting.split(":")[0]), float(setting.split(":")[1])
            outcomes = []
            for t in tests:
                out = attack(run, int(t), n_points=points, epsilon=eps, iterations=args.iterations)
                outcomes.append({"test_id": int(t), "confidence": float(proba[t].max()),
                                 "flipped": out["flipped"], "iterations": out["iterations"],
                                 "max_abs_delta": out["max_abs_delta"], "seconds": out["seconds"],
                                 "p_label_after": out["proba_after"][out["label"]]})
            flips = sum(o["flipped"] for o in outcomes)
            row = {"points": points, "epsilon": eps, "flipped": flips, "attempts": len(outcomes),
                   "rate": flips / len(outcomes),
                   "mean_iterations": float(np.mean([o["iterations"] for o in outcomes])),
                   "seconds_per_attack": float(np.mean([o["seconds"] for o in outcomes])),
                   "attempts_detail": outcomes}
            rows.append(row)
            print(f"{points:>6} {eps:>7g} {flips:>4}/{len(outcomes):<4} {row['rate']:>6.0%} "
                  f"{row['mean_iterations']:>10.1f} {row['seconds_per_attack']:>9.1f}", flush=True)
    report = {"model": args.model, "data": "digits", "n_train": run.n_train, "tests": tests.tolist(),
              "iterations": args.iterations, "settings": rows,
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__}, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
