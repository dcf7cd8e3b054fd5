"""Peer benchmark: this project's engine against captum's and pyDVL's influence functions.

One command runs the same model, data and θ̂ through every method and reports, per method:

- ``data→scores``: seconds from the raw data to the full (n_train × n_test) score matrix, training
  included. Ours: ``engine.build("digits", "logreg", ...)`` then ``run.scores()``. A peer: load the
  same digits split, train the same logistic regression in plain PyTorch (full-batch L-BFGS on the
  same objective, timed once per round in its own process and added to every peer's total), then
  fit the peer's influence object and query it for every test point.
- ``query``: the query step alone on an already fitted run/object (ours: ``run.scores()`` on the
  opened run; a peer: its own ``influences``/``influence`` call), warmed up, median of repeats.
- ``peak MB``: the peak resident memory the method added over its process's baseline (VmHWM after
  a ``/proc/self/clear_refs`` reset, minus VmRSS at the reset), and the process's absolute peak.
- agreement with our exact scores over the whole matrix: Pearson, Spearman, mean top-10 overlap of
  the harmful (most positive) and helpful (most negative) lists per test point, and the relative
  Frobenius error.

Imports are outside every clock: each worker imports scikit-learn, torch, ``torch._dynamo`` (which
torch.optim's first optimizer otherwise imports lazily, 1–1.5 s) and the engine before timing.
Every method runs in its own subprocess (so its peak memory is its own), and the methods are run
round-robin for ``--rounds`` rounds so that load from other processes on the machine spreads over
all of them; the table shows medians over rounds (and the minimum for data→scores).

Case: scikit-learn's bundled digits as ``engine.data.load_data("digits")`` splits them (1,297
training, 500 test points, pixels / 16), ``logreg`` = ``nn.Sequential(Flatten, Linear(64, 10))``
in float64 (650 parameters, ``named_parameters()`` order: weight row-major, then bias), objective
``R(θ) = mean cross-entropy + (λ/2)‖θ‖²`` with λ = 1e-2, so H = ∇²(mean loss) + λI. Every peer is
handed *our* θ̂ (the plain-PyTorch training is timed, and its distance to θ̂ reported), so the
agreement columns measure each method's approximation, not a different model.

Score conventions and the conversion to ours (CONTRACT.md: I = −∇L(z_test)ᵀ H⁻¹ ∇L(z_i),
positive = harmful, array (n_train, n_test)) -- see :data:`CONVENTIONS`:

- pyDVL 0.10 ``influences(x_test, y_test, x, y, mode=Up)`` returns ``+g_testᵀ (H + reg·I)⁻¹ g_i``
  with H the Hessian of the loss it is given (``F.cross_entropy``: the mean), shape (n_test,
  n_train). With ``regularization=λ``: ours = −(pyDVL)ᵀ.
- captum 0.9 ``NaiveInfluenceFunction`` / ``ArnoldiInfluenceFunction`` ``influence((x, y))``
  returns ``+g_testᵀ (Σ_i ∇²L_i + hessian_reg·I)⁻¹ g_i`` for a summed loss
  (``CrossEntropyLoss(reduction="sum")`` with ``sample_wise_grads_per_batch=True``), shape
  (n_test, n_train). With ``hessian_reg = n·λ`` the matrix is n·H, so ours = −n·(captum)ᵀ.

The conversion is checked in every run: for the methods that solve exactly (pyDVL Direct, captum
Naive at full rank) the converted scores must match ours to a relative error below
:data:`EXACT_REL_TOL`, and every method's least-squares scale against ours is reported (≈ 1 when
the conversion is right; approximate methods shrink it below 1).

Set up and run (or ``make bench-peers``)::

    python3 -m venv bench/.venv-peers
    bench/.venv-peers/bin/pip install torch==2.13.0          # first: the CPU wheel on disk
    bench/.venv-peers/bin/pip install -r bench/peers-requirements.txt
    bench/.venv-peers/bin/pip install --no-deps -e .         # the engine, peers' pins untouched
    bench/.venv-peers/bin/python bench/peers_bench.py        # -> bench/results/peers.json

The pure helpers (conventions, agreement metrics, summary and table) are in peers_lib.py and need
only NumPy, so the project's tests import them (re-exported here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_lib import (
    CONVENTIONS,
    EXACT_REL_TOL,
    METHODS,
    TOP_K,
    WEIGHT_DECAY,
    agreement,
    format_table,
    machine_info,
    median,
    mem_mb,
    pearson,
    rankdata,
    reset_peak,
    spearman,
    summarise,
    targets,
    to_ours,
    topk_overlap,
    warm_median,
)

# the pure helpers stay importable from here (tests/engine/test_peers_bench_helpers.py loads this file)
__all__ = ["agreement", "main", "pearson", "rankdata", "spearman", "to_ours", "topk_overlap"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "peers.json"


# ---------------------------------------------------------------- workers (run in subprocesses)
def _digits_tensors() -> tuple[Any, ...]:
    import torch

    from engine.data import load_data

    ds = load_data("digits", seed=0)
    return (torch.from_numpy(np.array(ds.x_train)), torch.from_numpy(np.array(ds.y_train)),
            torch.from_numpy(np.array(ds.x_test)), torch.from_numpy(np.array(ds.y_test)))


def _logreg(theta: Any) -> Any:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()
    with torch.no_grad():
        model[1].weight.copy_(theta[:640].view(10, 64))
        model[1].bias.copy_(theta[640:])
    return model


def worker_ours(shared: Path, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    import engine

    out = Path(tempfile.mkdtemp(dir=shared)) / "run"
    base = reset_peak()
    t = time.perf_counter()
    run = engine.build("digits", "logreg", out, weight_decay=WEIGHT_DECAY, ihvp=settings["ihvp"],
                       progress=False)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    scores = run.scores()
    t_first = time.perf_counter() - t
    total = t_build + t_first
    query, reps = warm_median(run.scores, t_first, repeats)
    hwm = mem_mb()[1]
    # the query alone on a freshly opened run: solver construction is part of its first call
    t = time.perf_counter()
    opened = engine.open_run(out)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    opened.scores()
    t_open_first = time.perf_counter() - t
    return {"scores": scores, "total_s": total, "build_s": t_build, "first_query_s": t_first,
            "query_s": query, "query_repeats": reps, "open_s": t_open, "opened_first_query_s": t_open_first,
            "peak_extra_mb": hwm - base, "peak_rss_mb": hwm, "build_timings": run.info.timings,
            "training": {k: run.info.training.get(k) for k in ("grad_norm", "iterations", "test_accuracy")},
            "theta": run.model.theta.cpu().numpy()}


def worker_train(shared: Path) -> dict[str, Any]:
    """Data → θ̂ in plain PyTorch: full-batch L-BFGS on mean cross-entropy + (λ/2)‖θ‖², float64."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    x, y, _, _ = _digits_tensors()
    t_data = time.perf_counter() - t0
    x = x.reshape(len(x), -1)
    w = torch.zeros(10, 64, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    # the engine's own L-BFGS settings (history 50, strong Wolfe); tolerance_grad is on max |g|
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=2000, history_size=50, tolerance_grad=1e-10,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")
    evals = 0

    def closure() -> Any:
        nonlocal evals
        evals += 1
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * WEIGHT_DECAY * (w.pow(2).sum() + b.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    t_total = time.perf_counter() - t0
    closure()
    grad_norm = float(torch.cat([w.grad.reshape(-1), b.grad.reshape(-1)]).norm())
    theta = torch.cat([w.detach().reshape(-1), b.detach().reshape(-1)]).numpy()
    return {"total_s": t_total, "data_s": t_data, "train_s": t_total - t_data, "lbfgs_evals": evals,
            "grad_norm": grad_norm, "theta": theta}


def worker_pydvl(shared: Path, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence
    from torch.utils.data import DataLoader, TensorDataset

    classes = {c.__name__: c for c in (DirectInfluence, CgInfluence, LissaInfluence, ArnoldiInfluence)}
    x, y, xt, yt = _digits_tensors()
    model = _logreg(torch.from_numpy(np.load(shared / "theta.npy")))
    kw = {k: v for k, v in settings.items() if k not in ("cls", "batch_size")}
    if settings["cls"] == "CgInfluence":
        kw["warn_on_max_iteration"] = False
    base = reset_peak()
    t = time.perf_counter()
    loader = DataLoader(TensorDataset(x, y), batch_size=settings.get("batch_size", len(x)))
    inf = classes[settings["cls"]](model, F.cross_entropy, regularization=WEIGHT_DECAY, **kw).fit(loader)
    t_fit = time.perf_counter() - t

    def query() -> Any:
        return inf.influences(xt, yt, x, y, mode=InfluenceMode.Up)

    t = time.perf_counter()
    raw = query().detach().numpy()
    t_first = time.perf_counter() - t
    q, reps = warm_median(query, t_first, repeats)
    hwm = mem_mb()[1]
    return {"scores": to_ours(raw, "pydvl", len(x)), "fit_s": t_fit, "first_query_s": t_first,
            "query_s": q, "query_repeats": reps, "peak_extra_mb": hwm - base, "peak_rss_mb": hwm}


def worker_captum(shared: Path, settings: dict[str, Any], repeats: int) -> dict[str, Any]:
    import torch
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    classes = {"NaiveInfluenceFunction": NaiveInfluenceFunction,
               "ArnoldiInfluenceFunction": ArnoldiInfluenceFunction}
    x, y, xt, yt = _digits_tensors()
    n = len(x)
    model = _logreg(torch.from_numpy(np.load(shared / "theta.npy")))
    checkpoint = shared / "captum-checkpoint.pt"  # captum loads θ̂ from a state_dict file
    torch.save(model.state_dict(), checkpoint)
    kw = {k: v for k, v in settings.items() if k != "cls"}
    base = reset_peak()
    t = time.perf_counter()
    inf = classes[settings["cls"]](
        model, DataLoader(TensorDataset(x, y), batch_size=n), str(checkpoint),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"), sample_wise_grads_per_batch=True,
        hessian_reg=n * WEIGHT_DECAY, **kw)
    t_fit = time.perf_counter() - t

    def query() -> Any:
        return inf.influence((xt, yt))

    t = time.perf_counter()
    raw = query().detach().numpy()
    t_first = time.perf_counter() - t
    q, reps = warm_median(query, t_first, repeats)
    hwm = mem_mb()[1]
    return {"scores": to_ours(raw, "captum", n), "fit_s": t_fit, "first_query_s": t_first,
            "query_s": q, "query_repeats": reps, "peak_extra_mb": hwm - base, "peak_rss_mb": hwm}


def worker_main(name: str, shared: Path, result: Path, repeats: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    # the same imports in every worker before any clock starts. torch.optim's first optimizer
    # imports torch._dynamo lazily (1-1.5 s here): without this it lands in whichever timed step
    # first builds one (our build's L-BFGS, the peers' training), not in a method's compute
    import sklearn.datasets  # noqa: F401
    import torch
    import torch._dynamo

    import engine  # noqa: F401

    if name == "train":
        res = worker_train(shared)
    else:
        _, family, settings = METHODS[name]
        fn = {"ours": worker_ours, "pydvl": worker_pydvl, "captum": worker_captum}[family]
        res = fn(shared, settings, repeats)
    arrays = {k: res.pop(k) for k in ("scores", "theta") if k in res}
    for k, v in arrays.items():
        np.save(result.with_suffix(f".{k}.npy"), v)
    import torch

    res["torch_threads"] = torch.get_num_threads()
    result.write_text(json.dumps(res))


# ---------------------------------------------------------------- parent
def _run_worker(name: str, shared: Path, repeats: int, timeout: float) -> dict[str, Any]:
    result = shared / f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--shared", str(shared),
           "--result", str(result), "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    res = json.loads(result.read_text())
    for k in ("scores", "theta"):
        path = result.with_suffix(f".{k}.npy")
        if path.exists():
            res[k] = np.load(path)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--rounds", type=int, default=3, help="round-robin passes over all methods")
    ap.add_argument("--repeats", type=int, default=5, help="warm query repeats per process")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per worker process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shared", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker, args.shared, args.result, args.repeats)
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}")
    methods = ["ours exact"] + [m for m in args.methods if m != "ours exact"]  # the reference first

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="peers-bench-") as tmp:
        shared = Path(tmp)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        train_runs: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            for name in ["ours exact", "train", *methods[1:]]:
                t = time.perf_counter()
                res = _run_worker(name, shared, args.repeats, args.timeout)
                print(f"[round {rnd + 1}/{args.rounds}] {name}: "
                      f"{res.get('error') or f'{time.perf_counter() - t:.1f} s wall'}", file=sys.stderr, flush=True)
                if name == "ours exact" and rnd == 0:
                    if "error" in res:
                        raise SystemExit(f"our exact reference failed: {res['error']}")
                    np.save(shared / "theta.npy", res["theta"])  # θ̂ every peer is handed
                (train_runs if name == "train" else runs[name]).append(res)
        exact = runs["ours exact"][0]["scores"]
        theta = runs["ours exact"][0]["theta"]
        torch_threads = runs["ours exact"][0].get("torch_threads")
    load_after = os.getloadavg()

    summary = {m: summarise(m, runs[m], train_runs, exact) for m in methods}
    ok_train = [t for t in train_runs if "error" not in t]
    peer_training: dict[str, Any] = {}
    if ok_train:
        peer_training = {"total_s": median([t["total_s"] for t in ok_train]),
                         "data_s": median([t["data_s"] for t in ok_train]),
                         "train_s": median([t["train_s"] for t in ok_train]),
                         "lbfgs_evals": ok_train[0]["lbfgs_evals"], "grad_norm": ok_train[0]["grad_norm"],
                         "theta_rel_diff_vs_ours": float(np.linalg.norm(ok_train[0]["theta"] - theta)
                                                         / np.linalg.norm(theta))}
    checks = [{"method": m, "rel_error": summary[m]["agreement"]["rel_error"],
               "fitted_scale": summary[m]["agreement"]["fitted_scale"],
               "ok": summary[m]["agreement"]["rel_error"] <= EXACT_REL_TOL}
              for m in ("pyDVL Direct", "captum Naive (full rank)") if m in summary and "agreement" in summary[m]]
    report = {
        "case": {"data": "digits", "model": "logreg", "weight_decay": WEIGHT_DECAY, "dtype": "float64",
                 "n_train": int(exact.shape[0]), "n_test": int(exact.shape[1]), "n_params": int(theta.size),
                 "top_k": TOP_K},
        "machine": machine_info(), "torch_threads": torch_threads,
        "load_avg_before": list(load_before), "load_avg_after": list(load_after),
        "rounds": args.rounds, "repeats": args.repeats,
        "conventions": {k: v.note for k, v in CONVENTIONS.items()},
        "peer_training": peer_training,
        "methods": summary,
        "conversion_checks": checks,
        "targets": targets(summary),
    }
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
