"""Our EK-FAC (``ihvp="ekfac"``) against kronfluence 1.0.1's, same model, data, θ̂ and damping.

Case: Fashion-MNIST (Debian's ``dataset-fashion-mnist``), a seeded stratified subset of
``--train-size`` training (default 5,000) and ``--test-size`` test points (default 100), as
``load_data("fashion-mnist", train_size=..., test_size=...)`` draws them; the built-in ``cnn``
architecture at channels (8, 16) (9,098 parameters: two Conv2d, one Linear, all with biases),
``quality_models:fmnist_cnn``, trained once (:func:`quality_models.train_weights`) and handed as
the same float64 ``state_dict`` to both libraries. Everything in float64.

- ours: ``engine.build(data, "quality_models:fmnist_cnn", weights=W, dtype="float64",
  ihvp="ekfac", weight_decay=λ, damping=δ)`` (an unprojected store: every parameter, per-sample
  gradients, EK-FAC factors in two capture passes), then ``run.scores(all test points,
  ihvp="ekfac")``. I = −g_testᵀ (EKFAC + (λ+δ)I)⁻¹ g_i, positive = harmful.
- kronfluence: ``prepare_model`` + ``Analyzer(cpu=True)``, ``fit_all_factors`` with
  ``FactorArguments(strategy="ekfac", use_empirical_fisher=True)`` and every dtype float64, then
  ``compute_pairwise_scores`` with ``ScoreArguments(damping_factor=λ+δ)`` (float64), training loss
  ``cross_entropy(reduction="sum")`` and the query measurement the test point's summed loss. It
  returns +g_testᵀ (EKFAC + damping·I)⁻¹ g_i (positive = helpful), shape (n_test, n_train).

Both fit the same curvature (kronfluence's ``prepare`` divides Λ by the sample count and adds the
damping to every corrected eigenvalue; covariance scales do not matter), so ours should equal
−(kronfluence)ᵀ. Reported: the Pearson correlation over all n_train × n_test scores (target ≥
0.99), the mean per-test Pearson, the least-squares scale of ours on −kronfluence and the relative
Frobenius error; and the wall time of fit + all scores of each (ours: the whole ``build`` from the
weights, data loading included, plus the query; kronfluence: ``fit_all_factors`` +
``compute_pairwise_scores``, model wrapping included), both in this one process, alternated over
``--rounds`` (the table shows the median) after an untimed warm-up of both on a small subset.
Target: ours at least 2× faster. On a shared 2-core machine pass ``--threads 1``: a 2-thread
OpenMP pool stalls when the other thread is descheduled (seen: ``F.unfold`` 10 ms → 0.9 s).

Set up and run (its own venv; ``bench/.venv-kronfluence`` must be git-ignored)::

    python3 -m venv bench/.venv-kronfluence
    bench/.venv-kronfluence/bin/pip install kronfluence==1.0.1 torch==2.13.0   # in ONE command
    bench/.venv-kronfluence/bin/pip uninstall -y torchvision                   # never imported
    bench/.venv-kronfluence/bin/pip install scikit-learn tqdm
    bench/.venv-kronfluence/bin/pip install --no-deps -e .
    bench/.venv-kronfluence/bin/python bench/kronfluence_compare.py   # -> bench/results/kronfluence_compare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import engine
from engine.data import load_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_models as qm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "kronfluence_compare.json"
MODEL = "quality_models:fmnist_cnn"
DATA = "fashion-mnist"
F64 = torch.float64
WARMUP = (256, 8)  # training and test points of the untimed warm-up of both libraries


def ours(args: argparse.Namespace, weights: Path, folder: Path) -> tuple[np.ndarray, dict[str, float]]:
    """Our scores (n_train, n_test) and seconds per stage."""
    t = time.perf_counter()
    run = engine.build(data=DATA, model=MODEL, out=folder, force=True, progress=False, weights=str(weights),
                       dtype="float64", ihvp="ekfac", weight_decay=args.weight_decay, damping=args.damping,
                       train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                       chunk_size=args.batch_size)
    built = time.perf_counter() - t
    scores = np.asarray(run.scores(None, ihvp="ekfac"), dtype=np.float64)  # (n_train, n_test)
    total = time.perf_counter() - t
    timings = run.info.timings
    stages = {k: float(v) for k, v in timings.items() if k != "total_s"}  # load_data_s, train_s, ...
    return scores, {"total_s": total, "build_s": built, "query_s": total - built,
                    "gradients_s": stages.get("gradients_s", 0.0), "fit_s": stages.get("curvature_s", 0.0),
                    "load_data_s": stages.get("load_data_s", 0.0), "theta_s": stages.get("train_s", 0.0),
                    "other_s": built - sum(stages.values())}  # plan, opening the run


def kronfluence_scores(args: argparse.Namespace, weights: Path, ds: Any, folder: Path
                       ) -> tuple[np.ndarray, dict[str, float]]:
    """kronfluence's scores (n_test, n_train), positive = helpful, and seconds per stage."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    train = TensorDataset(torch.tensor(ds.x_train, dtype=F64), torch.tensor(ds.y_train))
    test = TensorDataset(torch.tensor(ds.x_test, dtype=F64), torch.tensor(ds.y_test))
    t = time.perf_counter()
    model = qm.fmnist_cnn(ds.input_shape, ds.n_classes).to(F64)
    model.load_state_dict(torch.load(weights, weights_only=True))
    task = ClassificationTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name="compare", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=str(folder))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True,
                                  activation_covariance_dtype=F64, gradient_covariance_dtype=F64,
                                  eigendecomposition_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=args.batch_size,
                             factor_args=factor_args, overwrite_output_dir=True)
    fitted = time.perf_counter()
    score_args = ScoreArguments(damping_factor=args.weight_decay + args.damping, per_sample_gradient_dtype=F64,
                                precondition_dtype=F64, score_dtype=F64)
    analyzer.compute_pairwise_scores(scores_name="pairwise", factors_name="ekfac", query_dataset=test,
                                     train_dataset=train, per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=args.batch_size, score_args=score_args,
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].to(F64).numpy()  # (n_test, n_train)
    end = time.perf_counter()
    return scores, {"total_s": end - t, "fit_s": fitted - t, "query_s": end - fitted}


def compare(ours_scores: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Agreement of ours (n_train, n_test) with −theirsᵀ."""
    a, b = ours_scores, -theirs.T  # (n_train, n_test) each
    per_test = [float(np.corrcoef(a[:, j], b[:, j])[0, 1]) for j in range(a.shape[1])]
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "pearson_per_test_mean": float(np.mean(per_test)), "pearson_per_test_min": float(np.min(per_test)),
            "scale": float((a * b).sum() / (b * b).sum()),  # least squares: ours ≈ scale · (−theirsᵀ)
            "relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=512, help="both: training points per batch")
    ap.add_argument("--rounds", type=int, default=1)
    qm.add_common_args(ap, epochs=15, polish_s=20.0, work=ROOT / "runs" / "bench-kronfluence", results=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its GradScaler
    import kronfluence  # noqa: F401  (imports outside every clock)

    load_start = qm.load_average()
    ds = load_data(DATA, seed=args.seed, train_size=args.train_size, test_size=args.test_size)
    args.work.mkdir(parents=True, exist_ok=True)
    weights, training = qm.weights_for(args, ds, channels=qm.FMNIST_CHANNELS)
    # warm-up, untimed: first-call imports and kernel set-up of both libraries on a small subset
    warm = argparse.Namespace(**{**vars(args), "train_size": WARMUP[0], "test_size": WARMUP[1]})
    ours(warm, weights, args.work / "warm-ours")
    kronfluence_scores(warm, weights, load_data(DATA, seed=args.seed, train_size=WARMUP[0], test_size=WARMUP[1]),
                       args.work / "warm-kronfluence")
    times: dict[str, list[dict[str, float]]] = {"ours": [], "kronfluence": []}
    agreement: dict[str, float] = {}
    for r in range(args.rounds):
        s_ours, t_ours = ours(args, weights, args.work / "ours")
        times["ours"].append(t_ours)
        print(f"round {r}: ours {t_ours}", flush=True)
        s_kf, t_kf = kronfluence_scores(args, weights, ds, args.work / "kronfluence")
        times["kronfluence"].append(t_kf)
        print(f"round {r}: kronfluence {t_kf}", flush=True)
        agreement = compare(s_ours, s_kf)
        print(f"round {r}: {agreement}", flush=True)
    for name in ("ours", "kronfluence", "warm-ours", "warm-kronfluence"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    median = {lib: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for lib, ts in times.items()}
    speedup = median["kronfluence"]["total_s"] / median["ours"]["total_s"]
    load_end = qm.load_average()
    print(f"\n{'library':<12} {'fit s':>8} {'scores s':>9} {'total s':>8}   "
          f"({ds.n_train} train × {ds.n_test} test, float64, median of {args.rounds})")
    for lib in ("ours", "kronfluence"):
        m = median[lib]
        fit = m["fit_s"] + m.get("gradients_s", 0.0) if lib == "ours" else m["fit_s"]
        print(f"{lib:<12} {fit:>8.1f} {m['query_s']:>9.1f} {m['total_s']:>8.1f}")
    print("ours by stage: " + ", ".join(f"{k} {median['ours'][k]:.1f}" for k in (
        "load_data_s", "theta_s", "gradients_s", "fit_s", "other_s", "query_s")))
    print(f"ours {speedup:.2f}× faster (target ≥ 2); Pearson(ours, −kronfluenceᵀ) = {agreement['pearson']:.6f} "
          f"(target ≥ 0.99), per-test mean {agreement['pearson_per_test_mean']:.6f}, "
          f"scale {agreement['scale']:.4f}, relative error {agreement['relative_error']:.2e}")
    print(f"load average at start {load_start}, at end {load_end}")
    import kronfluence as kf

    result = {"case": {"data": DATA, "n_train": ds.n_train, "n_test": ds.n_test, "model": MODEL,
                       "channels": list(qm.FMNIST_CHANNELS), "dtype": "float64", "weight_decay": args.weight_decay,
                       "damping": args.damping, "kronfluence_damping_factor": args.weight_decay + args.damping,
                       "batch_size": args.batch_size, "rounds": args.rounds, "seed": args.seed,
                       "training": training, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "kronfluence": getattr(kf, "__version__", "1.0.1"),
                       "load_average_start": load_start, "load_average_end": load_end},
              "agreement": agreement, "times": times, "median": median, "speedup": speedup,
              "targets": {"pearson_at_least_0.99": agreement["pearson"] >= 0.99, "speedup_at_least_2": speedup >= 2}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
