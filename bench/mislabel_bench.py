"""Mislabel detection on Fashion-MNIST with recorded label flips (issue 14).

For each model, builds (or reopens) a run on a seeded, stratified Fashion-MNIST subset with
``--label-noise`` flipping a fraction of the training labels, then runs
:func:`engine.mislabel.mislabel_check`: AUC and recall@1/5/10/20% of |self-influence|, the
training loss and the (stored) gradient norm against the flips. ``--extra-ihvp`` adds rows of
self-influence under other IHVP methods. A random ranking has AUC 0.5 and recall@p% ≈ p/100;
with 10% of the labels flipped, a perfect one has recall@10% = 1 (and recall@1% at most 0.1).
``--brittle-tests N`` also searches the brittleness k (:func:`engine.brittle.brittleness`) of N
correctly predicted test points of each run.

Prints a table and writes JSON (default bench/results/mislabel_bench.json).

    python bench/mislabel_bench.py                                   # logreg and cnn, 2,000 images
    python bench/mislabel_bench.py --models cnn --train-size 5000 --extra-ihvp fisher
    python bench/mislabel_bench.py --models cnn --weight-decay 0.001   # a network that fits the flips
    python bench/mislabel_bench.py --models logreg --brittle-tests 3 --max-k 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine
from engine.brittle import brittleness
from engine.config import TrainConfig
from engine.errors import RunError
from engine.mislabel import mislabel_check

WEIGHT_DECAY = {"logreg": 0.01}  # the λ for logreg; networks take the config's default


def _run(model: str, args: argparse.Namespace) -> tuple[engine.Run, float | None]:
    """The run for ``model``: reopened when its folder exists (build seconds None), else built."""
    epochs = f"-e{args.epochs}" if args.epochs and model not in WEIGHT_DECAY else ""
    lam = f"-wd{args.weight_decay:g}" if args.weight_decay is not None else ""
    extra = {k: v for k, v in (("ihvp", args.ihvp), ("project", args.project), ("projection", args.projection),
                               ("kronecker_basis", args.kronecker_basis)) if v is not None}
    arch = {k: v for k, v in (("hidden", tuple(args.hidden) if args.hidden else None), ("width", args.width))
            if v is not None}
    tag = "".join(f"-{k}{v if not isinstance(v, tuple) else 'x'.join(map(str, v))}"
                  for k, v in {**extra, **arch}.items())
    out = Path(args.runs) / f"{model}-{args.train_size}-noise{args.label_noise:g}-seed{args.seed}{epochs}{lam}{tag}"
    if out.is_dir() and not args.rebuild:
        try:
            return engine.open_run(out), None
        except RunError:
            pass
    options: dict[str, Any] = {"train_size": args.train_size, "test_size": args.test_size,
                               "label_noise": args.label_noise, "seed": args.seed}
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    elif model in WEIGHT_DECAY:
        options["weight_decay"] = WEIGHT_DECAY[model]
    train = {**({"epochs": args.epochs} if args.epochs and model not in WEIGHT_DECAY else {}), **arch}
    if train:
        options["train"] = TrainConfig(**train)
    options.update(extra)
    t = time.perf_counter()
    run = engine.build(args.data, model, out, force=True, progress=args.progress, **options)
    return run, time.perf_counter() - t


def _accuracy(run: engine.Run) -> dict[str, float]:
    ds = run.dataset
    train = run.predictions("train").argmax(axis=1)
    return {"test": float((run.predictions("test").argmax(axis=1) == ds.y_test).mean()),
            "train_noisy_labels": float((train == ds.y_train).mean()),
            "train_clean_labels": float((train == ds.clean_y_train).mean()),
            "flipped_fitted": float((train[ds.flipped] == ds.y_train[ds.flipped]).mean())}


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    run, build_s = _run(model, args)
    reports = [mislabel_check(run, percents=args.percents)]
    for method in args.extra_ihvp:
        extra = mislabel_check(run, ihvp=method, percents=args.percents, save=False)
        reports.append({**extra, "scores": [r for r in extra["scores"] if r["score"] == "self_influence"]})
    rows = [{"model": model, "ihvp": rep["ihvp"], **row} for rep in reports for row in rep["scores"]]
    by = {(r["score"], r["ihvp"]): r for r in rows}
    si = by[("self_influence", reports[0]["ihvp"])]
    loss = by[("loss", reports[0]["ihvp"])]
    brittle = None
    if args.brittle_tests:
        brittle = brittleness(run, tests=args.brittle_tests, max_k=args.max_k, seed=args.seed,
                              progress=args.progress)
    return {
        "brittleness": brittle,
        "model": model, "ihvp": reports[0]["ihvp"], "dtype": str(run.model.dtype).replace("torch.", ""),
        "n_params": run.model.n_params, "projected": run.store.projected,
        "weight_decay": run.config.weight_decay, "damping": run.config.damping,
        "epochs": run.config.train.epochs,
        "n_train": run.n_train, "n_test": run.n_test, "n_flipped": reports[0]["n_flipped"],
        "build_seconds": build_s, "accuracy": _accuracy(run), "rows": rows,
        "self_influence_at_least_loss": {"auc": si["auc"] >= loss["auc"],
                                         "recall@10": si["recall"]["10"] >= loss["recall"]["10"]},
        "run": str(run.path),
    }


def _table(results: list[dict[str, Any]], percents: list[float]) -> str:
    head = ["model", "score", "ihvp", "AUC", *[f"R@{p:g}%" for p in percents], "seconds"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for res in results:
        for r in res["rows"]:
            cells = [res["model"], r["score"], r["ihvp"] if r["score"] == "self_influence" else "",
                     f"{r['auc']:.3f}", *[f"{r['recall'][f'{p:g}']:.3f}" for p in percents],
                     f"{r['seconds']:.1f}"]
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logreg,cnn", help="comma-separated model kinds")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="λ for every model (default: 0.01 for logreg, the config's for networks)")
    parser.add_argument("--epochs", type=int, default=0, help="networks: at most this many epochs (0: default)")
    parser.add_argument("--percents", type=float, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--ihvp", default=None, help="the runs' IHVP method (default: auto)")
    parser.add_argument("--project", type=int, default=None, help="store dimension K")
    parser.add_argument("--projection", default=None, help="dense or kronecker")
    parser.add_argument("--kronecker-basis", default=None, help="random or pca")
    parser.add_argument("--hidden", type=int, nargs="*", default=None, help="mlp hidden widths")
    parser.add_argument("--width", type=int, default=None, help="resnet base width")
    parser.add_argument("--extra-ihvp", nargs="*", default=[], help="more IHVP methods for self-influence")
    parser.add_argument("--brittle-tests", type=int, default=0,
                        help="also search the brittleness k of this many correctly predicted test points")
    parser.add_argument("--max-k", type=int, default=None, help="brittleness: the largest k searched")
    parser.add_argument("--runs", default="/tmp/mislabel_bench_runs", help="where the runs are built")
    parser.add_argument("--rebuild", action="store_true", help="rebuild runs that exist")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench/results/mislabel_bench.json"))
    args = parser.parse_args(argv)
    results = []
    for model in args.models.split(","):
        res = bench_model(model, args)
        results.append(res)
        print(f"{model}: {res['n_train']} train ({res['n_flipped']} flipped), {res['ihvp']}, "
              f"{res['dtype']}, p = {res['n_params']}, accuracy {res['accuracy']}, "
              f"build {res['build_seconds'] and round(res['build_seconds'], 1)} s", flush=True)
    print(_table(results, args.percents))
    for res in results:
        print(f"{res['model']}: self-influence ≥ training loss: {res['self_influence_at_least_loss']}")
        if res["brittleness"]:
            b = res["brittleness"]
            ks = [(r["test_id"], r["k"], r["max_k"], len(r["tried"])) for r in b["results"]]
            print(f"{res['model']} brittleness (test_id, k, max_k, retrainings): {ks} in {b['seconds']:.0f} s")
    payload = {"command": " ".join(sys.argv), "data": args.data, "train_size": args.train_size, "test_size": args.test_size,
               "label_noise": args.label_noise, "seed": args.seed, "percents": args.percents,
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.platform(), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
