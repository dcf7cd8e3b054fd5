"""What the build's store pass gathers on the way (engine.store_stage): EK-FAC's covariances
(and the few-position layers' captures for Λ), a user model's ‖∇R‖ from the rows' sum, and the
rows kept in memory for the returned run. Each against the separate passes it replaces, and the
layer-wise full rows against ``vmap(grad)``, in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.config import TrainConfig
from engine.grads.per_sample import per_sample_grads
from engine.models.train import objective_value_and_grad
from engine.runinfo import CURVATURE_FILE
from engine.stages import ekfac_factors
from engine.store.files import load_tensors
from engine.store_stage import MappedRows, PassGather

SMALL = TrainConfig(epochs=15, polish_s=0, channels=(4, 8))
F64 = {"progress": False, "dtype": "float64", "train": SMALL}
DIGITS = {"train_size": 300, "test_size": 30}
SPEC = f"{__name__}:user_mlp"


def user_mlp(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A user's model: every parameter in a Linear layer (so the full store is layer-wise)."""
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, n_classes))


def _separate_pass_factors(run: engine.Run) -> dict[str, torch.Tensor]:
    """EK-FAC's factors the way a resumed or distributed build makes them: a capture pass over
    the training data for the covariances, Λ from the store file's rows."""
    rows = MappedRows(run.path, expect={}, compute_dtype=torch.float64, device=torch.device("cpu"))
    return ekfac_factors(run.store.space, run.data.x_train, run.data.y_train, rows, progress=False)


@pytest.mark.parametrize("projection", [{}, {"project": 40, "projection": "kronecker"}],
                         ids=["full", "kronecker"])
def test_one_pass_ekfac_equals_the_separate_capture_pass(projection: dict, tmp_path: Path) -> None:
    run = engine.build("digits", "cnn", tmp_path / "r", ihvp="ekfac", **projection, **DIGITS, **F64)
    saved = load_tensors(run.path / CURVATURE_FILE)
    again = _separate_pass_factors(run)
    assert saved.keys() == again.keys()
    for key, value in again.items():
        if "eigenvectors" in key:  # bases up to the sign of each eigenvector: compare Q diag(σ) Qᵀ
            continue
        torch.testing.assert_close(saved[key], value, rtol=1e-9, atol=1e-12, msg=key)
    for key in [k for k in again if k.endswith("activation_eigenvectors")]:
        vals = key.replace("eigenvectors", "eigenvalues")
        for got in (saved, again):
            got[key + "/cov"] = got[key] @ torch.diag(got[vals]) @ got[key].T
        torch.testing.assert_close(saved[key + "/cov"], again[key + "/cov"], rtol=1e-9, atol=1e-12)
    # the scores of the returned run (rows kept in memory) equal a reopened run's (rows from the file)
    np.testing.assert_allclose(run.scores([0, 1]), engine.open_run(run.path).scores([0, 1]), rtol=1e-12)


def test_layerwise_full_rows_equal_vmap_per_sample_gradients(tmp_path: Path) -> None:
    """The full store an EK-FAC build writes layer-wise equals vmap(grad)'s per-sample gradients."""
    run = engine.build("digits", "cnn", tmp_path / "r", ihvp="ekfac", **DIGITS, **F64)
    obj, theta = run.model.objective, run.model.theta
    ref = per_sample_grads(obj, theta, run.data.x_train, run.data.y_train)  # (n, p)
    torch.testing.assert_close(run.store.resident.data, ref, rtol=1e-9, atol=1e-12)
    stored = np.load(run.path / "grads.npy")
    np.testing.assert_allclose(stored, ref.numpy(), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights of :func:`user_mlp` trained a little on digits (not to a stationary point)."""
    folder = tmp_path_factory.mktemp("user")
    ds = engine.data.load_data("digits", seed=0, **DIGITS)
    torch.manual_seed(0)
    model = user_mlp(ds.input_shape, ds.n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.tensor(np.asarray(ds.x_train), dtype=torch.float32)
    y = torch.tensor(np.asarray(ds.y_train))
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), folder / "w.pt")
    return folder / "w.pt"


def test_user_grad_norm_from_the_store_rows_equals_a_full_batch_pass(user_files: Path, tmp_path: Path) -> None:
    lam = 0.03
    run = engine.build("digits", SPEC, tmp_path / "u", weights=str(user_files), ihvp="ekfac",
                       weight_decay=lam, **DIGITS, progress=False, dtype="float64")
    training = run.info.raw["training"]
    assert training["grad_norm_from"] == "store rows"
    obj, theta = run.model.objective, run.model.theta
    _, g = objective_value_and_grad(obj, theta, run.data.x_train, run.data.y_train, weight_decay=lam)
    assert training["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert training["grad_norm"] > 1e-3  # not a stationary point: the λθ term and the rows both count
    # a projected store cannot give it: the full-batch pass, same value
    dense = engine.build("digits", SPEC, tmp_path / "d", weights=str(user_files), ihvp="fisher",
                         project=50, weight_decay=lam, **DIGITS, progress=False, dtype="float64")
    assert dense.info.raw["training"]["grad_norm_from"] == "full-batch pass"
    assert dense.info.raw["training"]["grad_norm"] == pytest.approx(training["grad_norm"], rel=1e-10)


def test_pass_gather_keeps_captures_only_of_few_position_layers() -> None:
    """A Linear head (1 position, 40 → 10) is kept for Λ; a conv-like layer (49 positions,
    9 → 4) is not (its captures would outweigh its gradient)."""
    from engine.ihvp.ekfac import CovarianceAccumulator, layer_layout

    gather = PassGather(covariances=CovarianceAccumulator(layer_layout([("fc", 10, 40), ("conv", 4, 9)])))

    class Caps:  # the two fields of engine.grads.capture.Captures that matter here
        projected = True

        def __init__(self) -> None:
            self.kron = {"fc": _Pair(torch.randn(3, 1, 40), torch.randn(3, 1, 10)),
                         "conv": _Pair(torch.randn(3, 49, 9), torch.randn(3, 49, 4))}

    gather.on_captures(slice(0, 3), Caps())  # type: ignore[arg-type]
    assert list(gather.captured) == ["fc"]
    assert gather.covariances is not None and gather.covariances.positions == {"fc": 3, "conv": 147}


class _Pair:
    def __init__(self, a: torch.Tensor, delta: torch.Tensor) -> None:
        self.a, self.delta = a, delta
