"""Ensembles: what N seeded models cost, and how fragile one model's top-k ranking is.

Builds ``--ensemble N`` cnn models on a Fashion-MNIST subset (default 5 members, 2,000 training
and 500 test images, the build's defaults otherwise), then reports:

- build time: each member's (member 0 alone is what a single-model build costs) and the total;
- query time: ``explain(top=10)`` on the ensemble against member 1 opened as a single run,
  first query (opens the members, builds the solvers) and warm (median over test points);
- consistency of the ensemble's top-k lists over ``--tests`` test points: the mean share of
  members that agree on a listed point (same sign as the mean and in their own top-k), the share
  of listed points every member agrees on and that at most one agrees on; and how much two
  single models' top-k lists overlap (|A ∩ B| / k, over every pair of members), and how much one
  model's list overlaps the ensemble's; and the Pearson and Spearman correlation of two members'
  scores over every training point.

Prints a table and writes JSON (default bench/results/ensemble_bench.json).

    python bench/ensemble_bench.py                         # 5 cnn, Fashion-MNIST 2,000 / 500
    python bench/ensemble_bench.py --members 3 --train-size 500 --epochs 10   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine
from engine.ensemble import member_folder


def _top_ids(scores: np.ndarray, k: int) -> tuple[set[int], set[int]]:
    """Helpful (most negative) and harmful (most positive) top-k ids of one score vector."""
    order = np.argsort(scores, kind="stable")
    return set(order[:k].tolist()), set(order[::-1][:k].tolist())


def measure(run: engine.Run, single: engine.Run, *, tests: np.ndarray, top: int) -> dict:
    t = time.perf_counter()
    run.explain(int(tests[0]), top=top)
    first_ens = time.perf_counter() - t
    t = time.perf_counter()
    single.explain(int(tests[0]), top=top)
    first_single = time.perf_counter() - t
    warm_ens, warm_single, agree, all_agree, at_most_one = [], [], [], [], []
    pair_overlap, single_vs_ens, pearson, spearman = [], [], [], []
    for i in tests[1:]:
        t = time.perf_counter()
        out = run.explain(int(i), top=top)
        warm_ens.append(time.perf_counter() - t)
        t = time.perf_counter()
        single.explain(int(i), top=top)
        warm_single.append(time.perf_counter() - t)
        counts = [r["consistency"]["agree_count"] for key in ("helpful", "harmful") for r in out[key]]
        n = run.config.ensemble
        agree.append(np.mean(counts) / n)
        all_agree.append(np.mean([c == n for c in counts]))
        at_most_one.append(np.mean([c <= 1 for c in counts]))
        ens_sets = ({r["train_id"] for r in out["helpful"]}, {r["train_id"] for r in out["harmful"]})
        per = run.member_scores(int(i))  # (N, n): cached by explain
        own = [_top_ids(s, top) for s in per]
        ranks = np.argsort(np.argsort(per, axis=1), axis=1)  # (N, n) ranks for Spearman
        for a, b in itertools.combinations(range(len(per)), 2):
            pearson.append(np.corrcoef(per[a], per[b])[0, 1])
            spearman.append(np.corrcoef(ranks[a], ranks[b])[0, 1])
        for a, b in itertools.combinations(own, 2):
            pair_overlap.append(np.mean([len(a[s] & b[s]) / top for s in (0, 1)]))
        single_vs_ens.append(np.mean([len(own[0][s] & ens_sets[s]) / top for s in (0, 1)]))
    return {"first_query_s": {"ensemble": first_ens, "single": first_single},
            "warm_query_s": {"ensemble": float(np.median(warm_ens)), "single": float(np.median(warm_single))},
            "mean_agree": float(np.mean(agree)), "all_agree_share": float(np.mean(all_agree)),
            "at_most_one_share": float(np.mean(at_most_one)),
            "pairwise_topk_overlap": float(np.mean(pair_overlap)),
            "single_vs_ensemble_topk_overlap": float(np.mean(single_vs_ens)),
            "pairwise_pearson": float(np.mean(pearson)), "pairwise_spearman": float(np.mean(spearman)),
            "tests": len(tests) - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=None, help="network epochs (the build's default)")
    p.add_argument("--tests", type=int, default=100, help="test points whose lists are measured")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--run", type=Path, default=ROOT / "bench" / "results" / "ensemble_run")
    p.add_argument("--reuse", action="store_true", help="reuse --run if it is already built")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ensemble_bench.json")
    a = p.parse_args()
    if not (a.reuse and (a.run / "run.json").is_file()):
        extra = {"train": engine.TrainConfig(epochs=a.epochs)} if a.epochs else {}
        t = time.perf_counter()
        engine.build(a.data, a.model, a.run, force=True, resume=True, ensemble=a.members,
                     train_size=a.train_size, test_size=a.test_size, progress=True, **extra)
        print(f"built in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    run = engine.open_run(a.run)
    single = engine.open_run(member_folder(a.run, 1))  # one member alone: a single-model run
    ens = run.info.raw["ensemble"]
    tests = np.random.default_rng(0).choice(run.n_test, size=min(a.tests + 1, run.n_test), replace=False)
    found = measure(run, single, tests=tests, top=a.top)
    result = {"data": a.data, "model": a.model, "members": ens["members"], "n_train": run.n_train,
              "n_test": run.n_test, "ihvp": run.default_method.value, "n_params": run.info.model.n_params,
              "build_s": ens["build_s"], "build_total_s": float(sum(ens["build_s"])),
              "test_accuracy": ens["test_accuracy"], "top": a.top, **found,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load": os.getloadavg()[0]}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2))
    b = result["build_s"]
    rows = [
        ("members", f"{result['members']} × {a.model} ({result['n_params']:,} params, {result['ihvp']})"),
        ("data", f"{a.data}: {result['n_train']:,} train / {result['n_test']:,} test"),
        ("build, one model (member 0)", f"{b[0]:.1f} s"),
        ("build, each member", ", ".join(f"{s:.1f}" for s in b) + " s"),
        ("build, ensemble total", f"{result['build_total_s']:.1f} s ({result['build_total_s'] / b[0]:.1f}× one)"),
        ("test accuracy per member", ", ".join(f"{x:.3f}" for x in result["test_accuracy"])),
        ("explain, first query", (f"ensemble {found['first_query_s']['ensemble'] * 1e3:.0f} ms, "
                                 f"single {found['first_query_s']['single'] * 1e3:.0f} ms")),
        ("explain, warm (median)", (f"ensemble {found['warm_query_s']['ensemble'] * 1e3:.1f} ms, "
                                   f"single {found['warm_query_s']['single'] * 1e3:.1f} ms")),
        (f"top-{a.top}: mean share of members agreeing", f"{found['mean_agree']:.3f}"),
        (f"top-{a.top}: listed points all members agree on", f"{found['all_agree_share']:.3f}"),
        (f"top-{a.top}: listed points ≤ 1 member agrees on", f"{found['at_most_one_share']:.3f}"),
        (f"top-{a.top} overlap, two single models", f"{found['pairwise_topk_overlap']:.3f}"),
        (f"top-{a.top} overlap, one model vs ensemble", f"{found['single_vs_ensemble_topk_overlap']:.3f}"),
        ("all scores, two single models", (f"Pearson {found['pairwise_pearson']:.3f}, "
                                          f"Spearman {found['pairwise_spearman']:.3f}")),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"(over {found['tests']} test points; JSON: {a.json})")


if __name__ == "__main__":
    main()
