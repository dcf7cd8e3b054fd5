"""Training-set attacks: the pixel influence I_pert,loss against finite differences of actual
retraining, and an attack whose flip is confirmed by retraining from scratch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.attack import attack, pixel_influence
from engine.models.train import train_convex


def _retrained_test_loss(run: engine.Run, x_train: np.ndarray, test_id: int) -> float:
    """Train logreg from zero on x_train (an independent path: L-BFGS + Newton from scratch)."""
    obj = run.model.objective
    obj.load_flat(torch.zeros_like(run.model.theta))
    x = torch.from_numpy(x_train).to(run.model.dtype)
    theta = train_convex(obj, x, run.data.y_train, weight_decay=run.config.weight_decay).theta
    obj.load_flat(run.model.theta)
    with torch.no_grad():
        return float(obj.mean_loss(theta, run.data.x_test[test_id : test_id + 1], run.data.y_test[test_id : test_id + 1]))


def test_pixel_influence_matches_retraining(blobs_run: engine.Run) -> None:
    """Δ test loss ≈ (1/n)·I_pert,loss·δ for a small δ on one input feature, checked by retraining."""
    run, t = blobs_run, 2
    train_ids = [int(i) for i in np.argsort(-np.abs(run.scores([t])[:, 0]))[:3]]
    infl = pixel_influence(run, train_ids, t)  # (3, d)
    assert infl.shape == (3, run.dataset.input_shape[0])
    base = _retrained_test_loss(run, np.array(run.dataset.x_train), t)
    for k, i in enumerate(train_ids):
        j = int(np.argmax(np.abs(infl[k])))
        h = 1e-3
        x = np.array(run.dataset.x_train)
        x[i, j] += h
        actual = _retrained_test_loss(run, x, t) - base
        predicted = infl[k, j] * h / run.n_train
        assert actual == pytest.approx(predicted, rel=0.05), (i, j)


def test_attack_flips_a_prediction_confirmed_by_retraining(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    x_test = np.array([[0.15, 0.0, 0.0, 0.0]])  # close to the boundary, on the positive side
    np.savez(tmp_path / "b.npz", X_train=x, y_train=y, X_test=x_test, y_test=np.array([1]))
    run = engine.build(str(tmp_path / "b.npz"), "logreg", tmp_path / "r", weight_decay=1e-2,
                       progress=False)
    assert run.predictions("test")[0].argmax() == 1
    out = attack(run, 0, n_points=10, epsilon=0.5, iterations=10)
    assert out["flipped"] and out["predicted_after"] == 0
    assert out["max_abs_delta"] <= 0.5 + 1e-12
    assert np.abs(out["perturbed"] - out["original"]).max() <= 0.5 + 1e-12
    # independent confirmation: train from scratch on the perturbed set
    xp = np.array(run.dataset.x_train)
    xp[out["train_ids"]] = out["perturbed"]
    obj = run.model.objective
    obj.load_flat(torch.zeros_like(run.model.theta))
    theta = train_convex(obj, torch.from_numpy(xp), run.data.y_train, weight_decay=1e-2).theta
    obj.load_flat(run.model.theta)
    with torch.no_grad():
        assert int(obj.logits(theta, run.data.x_test[:1]).argmax()) == 0
    # the run itself is untouched
    assert run.predictions("test")[0].argmax() == 1


def test_attack_rejects_bad_settings(blobs_run: engine.Run) -> None:
    with pytest.raises(engine.QueryError):
        attack(blobs_run, 0, epsilon=0.0)
    with pytest.raises(engine.IndexOutOfRange):
        attack(blobs_run, 10_000)
