"""The linear datamodeling score: masks, the vectorised Spearman score, and lds() on real runs
against an independent float64 computation (own Newton solver, dense Hessian, scipy's spearmanr)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import engine
import engine.lds as lds_module
from engine.errors import ModelError, QueryError
from engine.lds import (
    LDS_DIR,
    LDS_FILE,
    cache_path,
    lds,
    lds_score,
    load_lds,
    retrain_outputs,
    scratch_model,
    subset_masks,
)
from engine.models import build_model
from engine.validate import lds as validate_lds

LAM = 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, blobs_npz: Path) -> engine.Run:
    """A logreg run of its own: lds() writes into the run folder."""
    return engine.build(str(blobs_npz), "logreg", tmp_path_factory.mktemp("lds") / "logreg",
                        weight_decay=LAM, ihvp="exact", progress=False)


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory, blobs_npz: Path) -> engine.Run:
    return engine.build(str(blobs_npz), "mlp", tmp_path_factory.mktemp("lds") / "mlp", progress=False,
                        dtype="float64", ihvp="cg", damping=0.01,
                        train=engine.TrainConfig(epochs=8, hidden=(8,), lbfgs_steps=30, polish_s=5))


class Counting:
    """Wraps engine.lds._retrain_one and counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._inner = lds_module._retrain_one
        monkeypatch.setattr(lds_module, "_retrain_one", self)

    def __call__(self, *args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        return self._inner(*args, **kwargs)


# ---------------------------------------------------------------------------- pure parts
def test_subset_masks_exact_sizes_and_seeded() -> None:
    masks = subset_masks(101, subsets=7, fraction=0.3, seed=3)
    assert masks.shape == (7, 101) and masks.dtype == bool
    assert (masks.sum(axis=1) == 30).all()  # round(30.3)
    assert len({m.tobytes() for m in masks}) == 7  # distinct subsets
    np.testing.assert_array_equal(masks, subset_masks(101, subsets=7, fraction=0.3, seed=3))
    assert not np.array_equal(masks, subset_masks(101, subsets=7, fraction=0.3, seed=4))
    with pytest.raises(QueryError, match="fraction"):
        subset_masks(10, subsets=2, fraction=0.01, seed=0)  # 0 points per subset


def test_lds_score_matches_scipy_spearman_per_column() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 7))  # (n, T)
    masks = rng.random((20, 50)) < 0.5  # (M, n)
    outputs = np.round(masks @ scores + rng.normal(scale=2.0, size=(20, 7)))  # ties on purpose
    outputs[:, 3] = 1.5  # a constant output: no correlation
    res = lds_score(scores, masks, outputs, n_boot=500)
    expected = [spearmanr(masks @ scores[:, t], outputs[:, t]).statistic if t != 3 else np.nan
                for t in range(7)]
    np.testing.assert_allclose(res["per_test"], expected, rtol=0, atol=1e-12)
    assert np.isnan(res["per_test"][3]) and res["n_valid"] == 6
    assert res["lds"] == pytest.approx(np.nanmean(expected), abs=1e-12)
    lo, hi = res["ci95"]
    assert lo <= res["lds"] <= hi and hi - lo > 0
    # the margin rises as the loss falls: the prediction is negated
    margin = lds_score(scores, masks, -outputs, output="margin", n_boot=10)
    np.testing.assert_allclose(margin["per_test"], res["per_test"], atol=1e-12)
    assert lds_score(scores, masks, -outputs, n_boot=10)["lds"] == pytest.approx(-res["lds"])
    everything_constant = lds_score(scores, masks, np.ones_like(outputs), n_boot=10)
    assert np.isnan(everything_constant["lds"]) and everything_constant["n_valid"] == 0
    with pytest.raises(QueryError, match="output"):
        lds_score(scores, masks, outputs, output="accuracy")
    with pytest.raises(QueryError, match="shapes"):
        lds_score(scores, masks[:, :10], outputs)


# ---------------------------------------------------------------------------- the independent reference
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _objective(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    p = _softmax(x @ w)
    return float(-np.log(p[np.arange(len(y)), y]).mean() + 0.5 * LAM * (w * w).sum())


def _hessian(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Dense Hessian of the mean cross-entropy + (λ/2)‖w‖², w (d+1, C) flattened row-major."""
    p = _softmax(x @ w)  # (n, C)
    a = np.einsum("ik,km->ikm", p, np.eye(p.shape[1])) - np.einsum("ik,im->ikm", p, p)  # (n, C, C)
    h = np.einsum("ij,il,ikm->jklm", x, x, a) / len(x)  # (d+1, C, d+1, C)
    return h.reshape(w.size, w.size) + LAM * np.eye(w.size)


def _fit(x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """Multinomial logistic regression by damped Newton (Armijo) from zero, ‖∇‖ < 1e-12."""
    w = np.zeros((x.shape[1], c))
    onehot = np.eye(c)[y]
    for _ in range(100):
        g = x.T @ (_softmax(x @ w) - onehot) / len(x) + LAM * w  # (d+1, C)
        if np.linalg.norm(g) < 1e-12:
            break
        step = np.linalg.solve(_hessian(w, x), g.ravel()).reshape(w.shape)
        t, f0 = 1.0, _objective(w, x, y)
        while _objective(w - t * step, x, y) > f0 - 1e-4 * t * float((g * step).sum()) and t > 1e-8:
            t /= 2
        w = w - t * step
    return w


@pytest.mark.slow
def test_lds_of_logreg_matches_independent_float64_computation(run: engine.Run) -> None:
    result = lds(run, subsets=12, fraction=0.5, tests=20, save=False)
    ds = run.dataset
    c = ds.n_classes
    x = np.c_[np.asarray(ds.x_train, dtype=np.float64).reshape(ds.n_train, -1), np.ones(ds.n_train)]
    y = np.asarray(ds.y_train)
    tests = np.array(result["test_ids"])
    xt = np.c_[np.asarray(ds.x_test, dtype=np.float64).reshape(ds.n_test, -1)[tests], np.ones(len(tests))]
    yt = np.asarray(ds.y_test)[tests]
    w = _fit(x, y, c)
    h_inv = np.linalg.inv(_hessian(w, x))
    g_train = np.einsum("ij,ik->ijk", x, _softmax(x @ w) - np.eye(c)[y]).reshape(len(x), -1)  # (n, p)
    g_test = np.einsum("ij,ik->ijk", xt, _softmax(xt @ w) - np.eye(c)[yt]).reshape(len(xt), -1)
    influence = -g_train @ h_inv @ g_test.T  # (n, T): I_up,loss
    np.testing.assert_allclose(run.scores(tests), influence, rtol=1e-6, atol=1e-9)
    masks = subset_masks(ds.n_train, subsets=12, fraction=0.5, seed=0)
    losses = np.array([-np.log(_softmax(xt @ _fit(x[m], y[m], c))[np.arange(len(yt)), yt])
                       for m in masks])  # (M, T)
    expected = [spearmanr(masks @ influence[:, t], losses[:, t]).statistic for t in range(len(tests))]
    np.testing.assert_allclose(result["per_test"], expected, atol=1e-6)
    assert result["lds"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert result["lds"] > 0.5  # influence predicts a convex model's subsets well
    assert result["ci95"][0] <= result["lds"] <= result["ci95"][1]
    assert result["ihvp"] == "exact" and result["retraining"] == "scratch"
    assert result["subsets"] == 12 and result["n_train"] == ds.n_train and "optimum" in result["ground_truth"]
    json.dumps(result, allow_nan=False)  # JSON-ready as it is


@pytest.mark.slow
def test_cross_entropy_margin_is_a_monotone_transform_of_the_loss(run: engine.Run) -> None:
    """L = softplus(−margin) for cross-entropy, so both outputs give the same LDS."""
    got = retrain_outputs(run, subsets=12, fraction=0.5)
    np.testing.assert_allclose(got.losses, np.logaddexp(0.0, -got.margins), rtol=1e-10)
    loss = lds(run, subsets=12, tests=20, save=False)
    margin = lds(run, subsets=12, tests=20, output="margin", save=False)
    assert margin["per_test"] == pytest.approx(loss["per_test"], abs=1e-12)


# ---------------------------------------------------------------------------- cache, resume, files
@pytest.mark.slow
def test_another_ihvp_retrains_nothing_and_a_killed_job_resumes(
        run: engine.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    count = Counting(monkeypatch)
    first = lds(run, subsets=5, fraction=0.4, tests=10, ihvp="exact", save=False)
    assert count.calls == 5
    assert cache_path(run, subsets=5, fraction=0.4, seed=0, retraining="scratch").parent == run.path / LDS_DIR
    second = lds(run, subsets=5, fraction=0.4, tests=10, ihvp="cg", save=False)
    assert count.calls == 5 and second["ihvp"] == "cg"
    assert second["lds"] == pytest.approx(first["lds"], abs=1e-3)  # CG solves to 1e-8

    class Killed(Exception):
        pass

    def die_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        retrain_outputs(run, subsets=6, fraction=0.4, seed=9, callback=die_after_two)
    assert count.calls == 7
    seen: list[tuple[int, int]] = []
    resumed = retrain_outputs(run, subsets=6, fraction=0.4, seed=9,
                              callback=lambda d, t: seen.append((d, t)))
    assert count.calls == 11 and seen == [(2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]
    cache_path(run, subsets=6, fraction=0.4, seed=9, retraining="scratch").unlink()
    fresh = retrain_outputs(run, subsets=6, fraction=0.4, seed=9)
    assert count.calls == 17
    np.testing.assert_allclose(resumed.losses, fresh.losses, rtol=1e-8)
    assert np.isfinite(fresh.margins).all() and fresh.seconds > 0


def test_bad_settings_are_refused_before_retraining(run: engine.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    count = Counting(monkeypatch)
    for bad, match in [({"subsets": 1}, "subsets"), ({"fraction": 1.0}, "fraction"),
                       ({"fraction": 0.0}, "fraction"), ({"output": "accuracy"}, "output"),
                       ({"tests": 0}, "tests"), ({"tests": run.n_test + 1}, "tests"),
                       ({"retraining": "cold"}, "retraining"), ({"ihvp": "newton"}, "ihvp"),
                       ({"test_index": [run.n_test]}, "out of range")]:
        with pytest.raises(QueryError, match=match):
            lds(run, **{"subsets": 3, "tests": 5, **bad})
    assert count.calls == 0


@pytest.mark.slow
def test_saved_results_round_trip_and_replace_the_same_setting(run: engine.Run) -> None:
    a = lds(run, subsets=4, tests=5)
    b = lds(run, subsets=4, tests=8)  # same (ihvp, damping, output, subsets, fraction, retraining)
    c = validate_lds(run, subsets=4, tests=5, output="margin")
    saved = load_lds(run)
    assert len(saved) == 2 and saved == load_lds(run.path) == load_lds(str(run.path))
    assert saved[0]["test_ids"] == b["test_ids"] != a["test_ids"]
    assert saved[1]["output"] == c["output"] == "margin" and saved[1]["lds"] == pytest.approx(c["lds"])
    assert json.loads((run.path / LDS_FILE).read_text())["results"] == saved
    assert load_lds(run.path / "nowhere") == []


# ---------------------------------------------------------------------------- networks and user models
@pytest.mark.slow
def test_network_scratch_retraining_starts_from_a_seeded_init(mlp_run: engine.Run) -> None:
    keep = subset_masks(mlp_run.n_train, subsets=2, fraction=0.5, seed=0)[0]
    _, one = scratch_model(mlp_run, keep, init_seed=1)
    _, again = scratch_model(mlp_run, keep, init_seed=1)
    _, other = scratch_model(mlp_run, keep, init_seed=2)
    torch.testing.assert_close(again, one, rtol=1e-10, atol=1e-12)  # seeded: reproducible
    assert float((other - one).norm()) > 0.1 * float(one.norm())  # another init, another θ
    result = lds(mlp_run, subsets=4, tests=10, save=False)
    assert result["lds"] is not None and np.isfinite(result["lds"])
    assert "fresh init" in result["ground_truth"] and result["model"] == "mlp"
    warm = lds(mlp_run, subsets=3, tests=10, retraining="warm", save=False)
    assert warm["retraining"] == "warm" and "warm-started" in warm["ground_truth"]


@pytest.mark.slow
def test_scratch_resnet_learns_batchnorm_statistics_and_is_evaluated_in_eval_mode(tmp_path: Path) -> None:
    tc = engine.TrainConfig(epochs=2, width=4, polish_s=1, lbfgs_steps=3)
    run = engine.build("digits", "resnet", tmp_path / "r", project=32, projection="kronecker",
                       train=tc, progress=False, train_size=200, test_size=40)
    keep = subset_masks(run.n_train, subsets=2, fraction=0.5, seed=0)[0]
    obj, theta = scratch_model(run, keep, init_seed=5)
    bn = obj.model.bn1
    assert not obj.model.training
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # statistics were learnt
    assert not torch.equal(bn.running_mean, run.model.objective.model.bn1.running_mean)  # its own
    batch = obj.logits(theta, run.data.x_test[:5])
    np.testing.assert_allclose(obj.logits(theta, run.data.x_test[:1]).detach().numpy(),
                               batch[:1].detach().numpy(), rtol=1e-4, atol=1e-5)  # eval mode: per point


@pytest.mark.slow
def test_user_model_is_refused_scratch_and_retrained_warm(blobs_npz: Path, run: engine.Run,
                                                          tmp_path: Path) -> None:
    model = build_model(engine.ModelKind.LOGREG, input_shape=run.dataset.input_shape,
                        n_classes=run.dataset.n_classes, train=engine.TrainConfig(), seed=0).double()
    run.model.objective.load_flat(run.model.theta)
    model.load_state_dict(run.model.objective.model.state_dict())
    path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(path))
    user = engine.build(str(blobs_npz), str(path), tmp_path / "user", progress=False, dtype="float64",
                        ihvp="exact")
    with pytest.raises(ModelError, match="user model .* retraining='warm'"):
        lds(user, subsets=3, tests=5)
    warm = lds(user, subsets=3, tests=5, retraining="warm", save=False)
    assert warm["retraining"] == "warm" and warm["model"] == "user"
