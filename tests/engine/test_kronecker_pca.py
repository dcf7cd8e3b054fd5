"""Data-aware Kronecker bases (``--kronecker-basis pca``, engine.grads.pca): the bases against the
eigenvectors of covariances computed independently (from the raw data for a first layer, from the
softmax's closed-form output gradient for the last), the full-rank case against the unprojected
store, and a reopened run's queries against its store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.config import TrainConfig
from engine.errors import InfluenceError, ModelError
from engine.grads.kronecker import KroneckerProjector
from engine.grads.layers import select_modules
from engine.grads.pca import BASES_FILE, pca_bases, top_eigenvectors
from engine.models.losses import make_loss

F64 = {"progress": False, "dtype": "float64", "train": TrainConfig(epochs=15, polish_s=0, channels=(4, 8))}
DIGITS = {"train_size": 300, "test_size": 30}


def _span_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a aᵀ − b bᵀ‖ of two (d, k) orthonormal bases: 0 when they span the same subspace."""
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


def test_top_eigenvectors_dense_and_randomised_agree_with_eigh() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 2500  # above DENSE_EIGH_MAX: the randomised path
    q, _ = torch.linalg.qr(torch.randn(d, 40, generator=gen, dtype=torch.float64))
    spectrum = 0.8 ** torch.arange(40, dtype=torch.float64)  # decaying, as layer covariances do
    cov = q @ torch.diag(spectrum) @ q.T + 1e-4 * torch.eye(d, dtype=torch.float64)
    for k in (5, 20):
        got = top_eigenvectors(cov, k)
        assert torch.allclose(got.T @ got, torch.eye(k, dtype=torch.float64), atol=1e-10)
        assert _span_distance(got, q[:, :k]) < 1e-8
    small = cov[:50, :50]
    _, vecs = torch.linalg.eigh(small)
    got = top_eigenvectors(small, 3)
    assert _span_distance(got, vecs[:, -3:]) < 1e-8
    assert (got[got.abs().argmax(0), torch.arange(3)] > 0).all()  # signs fixed
    with pytest.raises(ValueError):
        top_eigenvectors(small, 0)


def test_pca_bases_are_the_top_eigenvectors_of_independently_computed_covariances() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) @ torch.diag(
        torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.2], dtype=torch.float64))  # (n, 6), distinct variances
    y = torch.randint(0, 5, (200,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double().eval()
    selection = select_modules(model, None)
    proj = KroneckerProjector(selection, 2 * 3 + 3 * 3, seed=0, dtype=torch.float64)
    bases = pca_bases(model, make_loss("mlp", svm_temperature=1.0), x, y, projector=proj)

    ones = torch.ones(len(x), 1, dtype=torch.float64)
    a0 = torch.cat([x, ones], 1)  # (n, 7): the first layer's input with its bias column
    _, k_in0 = proj.factors("0")
    _, vecs = torch.linalg.eigh(a0.T @ a0)
    assert _span_distance(bases["0"][1], vecs[:, -k_in0:]) < 1e-8
    with torch.no_grad():
        delta = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 5).double()  # (n, 5): ∂L_i/∂logits
    k_out2, _ = proj.factors("2")
    _, vecs = torch.linalg.eigh(delta.T @ delta)
    assert _span_distance(bases["2"][0], vecs[:, -k_out2:]) < 1e-8
    proj.set_bases(bases)
    assert proj.split()["basis"] == "pca"
    with pytest.raises(ModelError, match="shapes"):
        proj.set_bases({"0": (bases["0"][0][:, :1], bases["0"][1]), "2": bases["2"]})


def test_full_rank_pca_bases_rotate_and_leave_fisher_scores_unchanged(tmp_path: Path) -> None:
    """With K = p every factor is a square orthogonal matrix: the PCA-projected store is a
    rotation of the full one, and the damped Fisher's scores do not change."""
    full = engine.build("digits", "cnn", tmp_path / "full", ihvp="fisher", **DIGITS, **F64)
    p = full.model.n_params
    pca = engine.build("digits", "cnn", tmp_path / "pca", ihvp="fisher", project=p, projection="kronecker",
                       kronecker_basis="pca", **DIGITS, **F64)
    assert pca.store.space.dim == p and pca.store.manifest["projection"]["basis"] == "pca"
    a, b = full.scores([0, 1, 2]), pca.scores([0, 1, 2])
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9 * np.abs(a).max())


def test_a_pca_run_reopens_with_its_saved_bases(tmp_path: Path) -> None:
    run = engine.build("digits", "cnn", tmp_path / "k", project=40, projection="kronecker",
                       kronecker_basis="pca", ihvp="ekfac", **DIGITS, **F64)
    assert (run.path / BASES_FILE).is_file()
    again = engine.open_run(run.path)
    got = again.queries.input_gradients(run.data.x_train[:5], run.data.y_train[:5])
    torch.testing.assert_close(got, run.store.resident.data[:5], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(again.scores([0]), run.scores([0]), rtol=1e-10)
    (run.path / BASES_FILE).unlink()
    with pytest.raises(engine.errors.InfluenceError, match="projection.pt|bases"):
        engine.open_run(run.path)


def test_pca_basis_needs_a_kronecker_projection(tmp_path: Path) -> None:
    with pytest.raises(InfluenceError, match="--kronecker-basis pca needs"):
        engine.build("digits", "cnn", tmp_path / "x", kronecker_basis="pca", project=40, **DIGITS, **F64)


def test_the_sample_budget_bounds_the_covariance_pass() -> None:
    """A budget of one sample's products keeps the minimum number of samples; a large one all."""
    from engine.grads import pca

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=gen)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double().eval()
    proj = KroneckerProjector(select_modules(model, None), 15, seed=0, dtype=torch.float64)
    seen: list[tuple[int, int]] = []
    loss = make_loss("mlp", svm_temperature=1.0)
    few = pca_bases(model, loss, x, y, projector=proj, budget=1.0, progress=lambda d, t: seen.append((d, t)))
    assert proj.basis_samples == pca.PCA_MIN_SAMPLES and seen[-1] == (pca.PCA_MIN_SAMPLES, pca.PCA_MIN_SAMPLES)
    ref = pca_bases(model, loss, x[: pca.PCA_MIN_SAMPLES], y[: pca.PCA_MIN_SAMPLES], projector=proj)
    for name in ref:
        torch.testing.assert_close(few[name][1], ref[name][1])
    pca_bases(model, loss, x, y, projector=proj)
    assert proj.basis_samples == 300


@pytest.mark.parametrize("budget", [None, 1.0], ids=["default", "one-sample budget"])
def test_the_plan_counts_the_points_the_bases_use(budget: float | None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the plan once assumed up to 1,024 points whatever the budget (6 min estimated for a
    # ResNet-18 whose bases took 128 points and 22.5 s)
    from engine.grads import pca

    if budget is not None:
        monkeypatch.setattr(pca, "PCA_BUDGET", budget)
    run = engine.build("digits", "cnn", tmp_path / "k", project=40, projection="kronecker",
                       kronecker_basis="pca", ihvp="fisher", **DIGITS, **F64)
    used = run.store.manifest["projection"]["split"]["basis_samples"]
    assert used == (300 if budget is None else pca.PCA_MIN_SAMPLES)
    (stage,) = [s for s in run.info.raw["plan"]["stages"] if s["name"] == "kronecker bases"]
    assert stage["note"].startswith(f"layer covariances of {used:,} points")


def test_a_torchscript_model_with_pca_bases_gets_the_gradient_space_advice(blobs_npz: Path,
                                                                           tmp_path: Path) -> None:
    # the plan's capture skips a model it cannot hook; the build then says what to use instead
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(path))
    with pytest.raises(InfluenceError, match="TorchScript model can use --projection dense"):
        engine.build(str(blobs_npz), str(path), tmp_path / "user", progress=False, dtype="float64",
                     projection="kronecker", project=4, kronecker_basis="pca", ihvp="fisher")
