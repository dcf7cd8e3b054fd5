"""The linear datamodeling score (LDS; Park et al. 2023, TRAK): does summed influence rank the
outputs of models retrained on random subsets of the training set?

For M seeded subsets S_m, each holding ``round(f·n)`` training points, a model is retrained on
S_m alone (the mean objective ``(1/|S|) Σ_{i∈S} L(z_i, θ) + (λ/2)‖θ‖²``). Influence predicts
the test loss of that model up to a constant: removing the points outside S changes it by about
``−Σ_{i∉S} I/n = (Σ_{i∈S} I − Σ_i I)/n``, so per test point z the prediction is

    g_m(z) = Σ_{i∈S_m} I_up,loss(z_i, z)                          (loss)
    g_m(z) = −Σ_{i∈S_m} I_up,loss(z_i, z)                         (margin: it falls as the loss rises)

and the score of z is the Spearman correlation over m between g_m(z) and the retrained model's
output: its test loss, or its margin ``logit_y − logsumexp_{c≠y} logit_c``. The LDS is the mean
over test points, with a percentile-bootstrap 95% interval over test points. A test point whose
prediction or output is the same on every subset has no correlation (NaN): it is left out of the
mean and the interval (``per_test`` keeps it as NaN; :func:`lds`'s JSON-ready result as None).

Retraining (the ground truth): convex models (logreg, svm) to the optimum of each subset's
objective, which does not depend on the start (:mod:`engine.validate`'s machinery); networks
"scratch" from a fresh seeded init (seed + m) with the run's own recipe (the build's
:func:`~engine.stages.train_theta`), or "warm" from θ̂ by full-batch L-BFGS. The outputs of every
test point are cached in ``<run>/lds/`` after each subset, so a killed job resumes and another
IHVP method, damping or test selection retrains nothing.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch.func import vmap
from tqdm.auto import tqdm

from .config import ModelKind
from .errors import ModelError, QueryError, RunError
from .models import make_module, make_objective
from .models.objective import Objective
from .models.train import stopping_rule
from .query.scoring import check_indices
from .run import Run
from .solvers import parse_method
from .stages import train_theta
from .store.files import atomic_write_bytes, load_json, save_json
from .validate import newton_solver, retrain_without

__all__ = ["LDS_DIR", "LDS_FILE", "OUTPUTS", "RETRAINING", "Retrained", "cache_path", "lds", "lds_score",
           "load_lds", "retrain_outputs", "save_lds", "scratch_model", "subset_masks"]

LDS_FILE = "lds.json"  # in the run folder: {"results": [one lds() result per setting]}
LDS_DIR = "lds"  # in the run folder: the retrained models' test outputs, one .npz per setting
OUTPUTS = ("loss", "margin")
RETRAINING = ("scratch", "warm")
WARM_LBFGS_STEPS = 300  # full-batch L-BFGS iterations of a warm-started network retraining
OUTPUT_CHUNK = 1024  # test points per forward pass
BOOT_CHUNK = 100  # bootstrap resamples drawn at once

Callback = Callable[[int, int], None]


@dataclass
class Retrained:
    """Test outputs of the models retrained on M subsets: row m is the model trained on
    ``masks[m]``; columns are EVERY test point of the run, so any test selection reuses them."""

    masks: np.ndarray  # (M, n_train) bool
    losses: np.ndarray  # (M, n_test) float64: L(z_test, θ_m)
    margins: np.ndarray  # (M, n_test) float64: logit_y − logsumexp of the other logits
    retraining: str  # "scratch" or "warm"
    ground_truth: str  # one line: how the models were retrained
    seconds: float  # retraining time summed over the subsets (including earlier, resumed calls)


# ---------------------------------------------------------------------------------- pure math
def subset_masks(n: int, *, subsets: int, fraction: float, seed: int) -> np.ndarray:
    """M = ``subsets`` random subsets of range(n), each of exactly ``round(fraction·n)`` points
    (Python's rounding), as a bool array (M, n); row m is a seeded permutation's first points."""
    size = round(fraction * n)
    if not 1 <= size < n:
        raise QueryError(f"a fraction of {fraction:g} of {n} training points leaves {size} per "
                         "subset; choose one that keeps at least 1 and leaves out at least 1")
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), dtype=bool)  # (M, n)
    for m in range(subsets):
        masks[m, rng.permutation(n)[:size]] = True
    return masks


def _column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of a and b (M, T) → (T,); tied values take their
    average rank; NaN where a column is constant (or holds a NaN)."""
    ra = rankdata(a, axis=0)  # (M, T)
    rb = rankdata(b, axis=0)  # (M, T)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    den = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))  # (T,)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=0) / den  # (T,)
    rho[~(den > 0)] = np.nan
    return rho


def lds_score(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray, *, output: str = "loss",
              n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The LDS of influence ``scores`` (n, T), ``I_up,loss(z_i, z_t)``, against the ``outputs``
    (M, T) of models retrained on ``masks`` (M, n).

    Per test point t: ``ρ_t = spearman_m(±Σ_i masks[m, i]·scores[i, t], outputs[m, t])`` (minus
    for ``output="margin"``). Returns ``{"lds": mean of the finite ρ_t, "ci95": [lo, hi]
    (percentile bootstrap of that mean over test points, n_boot resamples, seeded), "per_test":
    [ρ_t] (NaN where a side is constant over the subsets), "n_valid": how many are finite}``;
    the LDS and its interval are NaN when no test point is.
    """
    if output not in OUTPUTS:
        raise QueryError(f"unknown output {output!r}: use {' or '.join(OUTPUTS)}")
    scores, outputs = np.asarray(scores, dtype=np.float64), np.asarray(outputs, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if scores.ndim != 2 or masks.ndim != 2 or outputs.shape != (masks.shape[0], scores.shape[1]) \
            or masks.shape[1] != scores.shape[0]:
        raise QueryError(f"shapes do not match: scores {scores.shape} (n, T), masks {masks.shape} "
                         f"(M, n), outputs {outputs.shape} (M, T)")
    if n_boot < 1:
        raise QueryError(f"n_boot must be at least 1, got {n_boot}")
    predicted = masks.astype(np.float64) @ scores  # (M, T): Σ_{i∈S_m} I(z_i, z_t)
    if output == "margin":
        predicted = -predicted
    rho = _column_spearman(predicted, outputs)  # (T,)
    valid = rho[np.isfinite(rho)]  # (V,)
    if valid.size == 0:
        mean, ci = float("nan"), [float("nan"), float("nan")]
    else:
        rng = np.random.default_rng(seed)
        boots = np.concatenate([valid[rng.integers(0, valid.size, size=(min(BOOT_CHUNK, n_boot - s),
                                                                         valid.size))].mean(axis=1)
                                for s in range(0, n_boot, BOOT_CHUNK)])  # (n_boot,)
        mean = float(valid.mean())
        ci = [float(v) for v in np.percentile(boots, [2.5, 97.5])]
    return {"lds": mean, "ci95": ci, "per_test": [float(r) for r in rho], "n_valid": int(valid.size)}


# ---------------------------------------------------------------------------------- retraining
def _outputs(obj: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per-point loss and margin (each float64 (b,)) of the model at θ on x (b, ...), y (b,)."""
    losses, margins = [], []
    with torch.no_grad():
        for s in range(0, len(x), OUTPUT_CHUNK):
            xb, yb = x[s : s + OUTPUT_CHUNK], y[s : s + OUTPUT_CHUNK].to(obj.device)
            logits = obj.logits(theta, xb)  # (b, C)
            losses.append(vmap(lambda li, yi: obj.loss_fn(li[None], yi[None]))(logits, yb))
            true = logits.gather(1, yb[:, None])[:, 0]  # (b,)
            others = logits.scatter(1, yb[:, None], float("-inf"))  # (b, C)
            margins.append(true - torch.logsumexp(others, dim=1))
    return (torch.cat(losses).cpu().double().numpy(), torch.cat(margins).cpu().double().numpy())


def _check_settings(run: Run, *, subsets: int, fraction: float, retraining: str) -> None:
    """Refuse settings retrain_outputs cannot use, before anything is computed."""
    if isinstance(subsets, bool) or not isinstance(subsets, (int, np.integer)) or subsets < 2:
        raise QueryError(f"subsets must be an integer of at least 2 (a correlation over subsets), "
                         f"got {subsets!r}")
    if not 0 < fraction < 1:
        raise QueryError(f"fraction must be between 0 and 1 (exclusive), got {fraction}")
    if retraining not in RETRAINING:
        raise QueryError(f"unknown retraining {retraining!r}: use {' or '.join(RETRAINING)}")
    if retraining == "scratch" and run.info.model.kind is ModelKind.USER:
        raise ModelError("LDS with scratch retraining needs the model's training recipe, and a user "
                         f"model ({run.info.model.spec}) has none: use retraining='warm' "
                         "(--retraining warm: L-BFGS from θ̂ on each subset)")


def _ground_truth(run: Run, retraining: str, *, seed: int, subsets: int, n_subset: int) -> str:
    kind = run.info.model.kind
    if kind is ModelKind.SVM:
        return "each subset's hinge SVM retrained to its optimum (liblinear)"
    if kind.convex:
        return ("each subset retrained to the optimum of its convex objective (from θ̂: Newton, or "
                "L-BFGS for large p; the optimum does not depend on the start)")
    if retraining == "warm":
        return (f"warm-started: full-batch L-BFGS from θ̂ on each subset (≤ {WARM_LBFGS_STEPS} "
                "iterations); it does not measure the noise of training from scratch")
    tc = run.config.train
    return (f"each subset trained from scratch: a fresh init (seed {seed} + subset, {seed}.."
            f"{seed + subsets - 1}) and the run's recipe on its {n_subset} points: "
            f"{stopping_rule(tc, n_subset)}")


def scratch_model(run: Run, keep: np.ndarray, *, init_seed: int) -> tuple[Objective, torch.Tensor]:
    """A network trained on the points ``keep`` (n,) bool from a fresh init seeded ``init_seed``,
    with the run's recipe and the build's own training function (BatchNorm trains in train mode,
    its running statistics stay in the returned objective's module, evaluated in eval mode).
    Returns the objective over every trainable parameter and its θ (p_all,)."""
    config = dataclasses.replace(run.config, seed=init_seed)  # a fresh init and minibatch order
    ds, data = run.dataset, run.data
    module = make_module(config, input_shape=ds.input_shape, n_classes=ds.n_classes)
    obj = make_objective(module, config, device=run.device, dtype=run.model.dtype)  # every parameter
    mask = torch.from_numpy(keep)
    x, y = data.x_train[mask.to(data.x_train.device)], data.y_train[mask.to(data.y_train.device)]
    theta, _ = train_theta(config, run.info.model.kind, obj, ds, x, y, dev=run.device,
                           dtype=run.model.dtype, progress=False)  # (p_all,)
    return obj, theta


def _retrain_one(run: Run, keep: np.ndarray, *, retraining: str, init_seed: int, newton: Any
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Losses and margins (each (n_test,)) of the model retrained on the points ``keep`` (n,)."""
    data = run.data
    if run.info.model.convex or retraining == "warm":
        theta = retrain_without(run, torch.from_numpy(keep), newton=newton,
                                lbfgs_steps=WARM_LBFGS_STEPS)  # (p,)
        return _outputs(run.model.objective, theta, data.x_test, data.y_test)
    obj, theta = scratch_model(run, keep, init_seed=init_seed)
    return _outputs(obj, theta, data.x_test, data.y_test)


def cache_path(run: Run, *, subsets: int, fraction: float, seed: int, retraining: str) -> Path:
    """Where :func:`retrain_outputs` keeps the outputs of one setting for this run's θ̂."""
    fp = run.info.model.fingerprint[:16]
    return run.path / LDS_DIR / f"{retraining}-m{subsets}-f{float(fraction)!r}-s{seed}-{fp}.npz"


def _load_cache(path: Path, masks: np.ndarray, n_test: int) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file that matches ``masks`` and the test split; None otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            state = {k: f[k] for k in ("masks", "losses", "margins", "done", "seconds")}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from another version: retrain
    ok = (np.array_equal(state["masks"], masks) and state["losses"].shape == (len(masks), n_test)
          and state["margins"].shape == (len(masks), n_test) and state["done"].shape == (len(masks),))
    return state if ok else None


def _save_cache(path: Path, state: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **state)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def retrain_outputs(run: Run, *, subsets: int, fraction: float, seed: int = 0,
                    retraining: str = "scratch", progress: bool = False,
                    callback: Callback | None = None) -> Retrained:
    """Retrain once per subset of :func:`subset_masks` (``subsets``, ``fraction``, ``seed``) and
    return every test point's loss and margin under each retrained model.

    Cached in ``run.path / LDS_DIR`` per (subsets, fraction, seed, retraining, θ̂'s fingerprint),
    saved after every subset: a killed call resumes where it stopped, and a second call retrains
    nothing. ``callback(done, total)`` runs once at the start and after each subset; ``progress``
    shows a bar on stderr. Network subset m starts from init seed ``seed + m`` ("scratch").
    """
    _check_settings(run, subsets=subsets, fraction=fraction, retraining=retraining)
    masks = subset_masks(run.n_train, subsets=subsets, fraction=fraction, seed=seed)  # (M, n)
    path = cache_path(run, subsets=subsets, fraction=fraction, seed=seed, retraining=retraining)
    state = _load_cache(path, masks, run.n_test) or {
        "masks": masks, "losses": np.full((subsets, run.n_test), np.nan),
        "margins": np.full((subsets, run.n_test), np.nan), "done": np.zeros(subsets, dtype=bool),
        "seconds": np.zeros(subsets)}
    done = state["done"]
    newton = newton_solver(run) if run.info.model.convex else None
    if callback:
        callback(int(done.sum()), subsets)
    with tqdm(total=subsets, initial=int(done.sum()), desc=f"lds retrain ({retraining})", unit="model",
              disable=not progress, file=sys.stderr) as bar:
        for m in np.flatnonzero(~done):
            t = time.perf_counter()
            state["losses"][m], state["margins"][m] = _retrain_one(
                run, masks[m], retraining=retraining, init_seed=seed + int(m), newton=newton)
            state["seconds"][m] = time.perf_counter() - t
            done[m] = True
            _save_cache(path, state)
            bar.update(1)
            if callback:
                callback(int(done.sum()), subsets)
    return Retrained(masks=masks, losses=state["losses"], margins=state["margins"],
                     retraining=retraining, seconds=float(state["seconds"].sum()),
                     ground_truth=_ground_truth(run, retraining, seed=seed, subsets=subsets,
                                                 n_subset=round(fraction * run.n_train)))


# ---------------------------------------------------------------------------------- the facade
def _json_number(v: float) -> float | None:
    return v if np.isfinite(v) else None


def _key(result: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(result.get(k) for k in ("ihvp", "damping", "output", "subsets", "fraction", "retraining"))


def load_lds(run_or_path: Run | str | Path) -> list[dict[str, Any]]:
    """The saved LDS results of a run (its ``lds.json``), oldest first; [] when there are none."""
    folder = run_or_path.path if isinstance(run_or_path, Run) else Path(run_or_path)
    path = folder / LDS_FILE
    if not path.is_file():
        return []
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise RunError(f"{path}: malformed (expected {{\"results\": [...]}}); delete it and rerun lds")
    return data["results"]


def save_lds(folder: Path, result: dict[str, Any]) -> None:
    """Append ``result`` to ``folder / LDS_FILE``, replacing an earlier result of the same
    (ihvp, damping, output, subsets, fraction, retraining)."""
    kept = [r for r in load_lds(folder) if _key(r) != _key(result)]
    save_json(Path(folder) / LDS_FILE, {"results": [*kept, result]})


def lds(run: Run, *, subsets: int = 30, fraction: float = 0.5, tests: int = 100,
        test_index: Sequence[int] | np.ndarray | None = None, output: str = "loss",
        ihvp: str | None = None, damping: float | None = None, retraining: str = "scratch",
        seed: int = 0, save: bool = True, progress: bool = False,
        callback: Callback | None = None) -> dict[str, Any]:
    """The linear datamodeling score of the run's ``I_up,loss`` (see the module docstring).

    Test points: ``test_index``, or ``tests`` of them drawn without replacement with ``seed``
    (sorted). Scores from ``run.scores(test_ids, ihvp, damping=damping)`` (n_train, T); the
    retrained outputs from :func:`retrain_outputs` (cached). Returns a JSON-ready dict: "lds",
    "ci95" [lo, hi] and "per_test" (None where undefined), "subsets", "fraction", "output",
    "ihvp", "damping", "retraining", "ground_truth", "test_ids", "n_valid", "seed", "model", "n_train",
    "retrain_seconds" (summed over subsets, cached ones included), "score_seconds", "seconds"
    (this call) and "created". ``save``: also kept in ``run.path / LDS_FILE``.
    """
    t0 = time.perf_counter()
    if output not in OUTPUTS:
        raise QueryError(f"unknown output {output!r}: use {' or '.join(OUTPUTS)}")
    _check_settings(run, subsets=subsets, fraction=fraction, retraining=retraining)
    subset_masks(run.n_train, subsets=2, fraction=fraction, seed=seed)  # refuses empty subsets early
    if test_index is None:
        if not 1 <= tests <= run.n_test:
            raise QueryError(f"tests must be between 1 and the {run.n_test} test points, got {tests}")
        test_ids = np.sort(np.random.default_rng(seed).choice(run.n_test, size=tests, replace=False))
    else:
        test_ids = check_indices(test_index, run.n_test, "test")
        if test_ids.size == 0:
            raise QueryError("test_index names no test point")
    t = time.perf_counter()
    scores = run.scores(test_ids, ihvp, damping=damping)  # (n, T); refuses a bad ihvp or damping
    score_seconds = time.perf_counter() - t
    retrained = retrain_outputs(run, subsets=subsets, fraction=fraction, seed=seed,
                                retraining=retraining, progress=progress, callback=callback)
    found = (retrained.losses if output == "loss" else retrained.margins)[:, test_ids]  # (M, T)
    res = lds_score(scores, retrained.masks, found, output=output, seed=seed)
    method = parse_method(ihvp) or run.default_method
    result = {
        "lds": _json_number(res["lds"]),
        "ci95": [_json_number(v) for v in res["ci95"]],
        "per_test": [_json_number(v) for v in res["per_test"]],
        "n_valid": res["n_valid"],
        "subsets": subsets, "fraction": float(fraction), "output": output, "ihvp": method.value,
        "damping": float(run.config.damping if damping is None else damping),
        "retraining": retraining, "ground_truth": retrained.ground_truth,
        "test_ids": [int(i) for i in test_ids], "seed": seed,
        "model": run.info.model.kind.value, "n_train": run.n_train,
        "retrain_seconds": retrained.seconds, "score_seconds": score_seconds,
        "seconds": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if save:
        save_lds(run.path, result)
    return result
