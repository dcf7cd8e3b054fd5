"""A user's own ResNet with BatchNorm through ``package.module:factory --weights``, Kronecker-
projected store, Fisher curvature: it builds in eval mode, explains, reopens to the same scores,
and its scores equal a float64 torch.func reference.

The reference: at full rank (K = p) every Kronecker factor is a square orthonormal matrix, so
the store rows are an exact rotation ``g̃ = Q g`` of the per-sample gradients and the Fisher
scores ``−g̃_tᵀ (F̃ + λI)⁻¹ g̃_i`` equal ``−g_tᵀ (F + λI)⁻¹ g_i`` with ``F = (1/n) Σ g_i g_iᵀ``,
computed here from ``vmap(grad)`` over the user's model in eval mode (BatchNorm on its running
statistics), never from the engine's capture or projection code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import engine
from engine.models.resnet import BasicBlock

N_TRAIN, N_TEST, SIDE, CLASSES, WIDTH = 200, 30, 8, 3, 4
SPEC = f"{__name__}:tiny_resnet"


class TinyResNet(nn.Module):
    """A user's ResNet (its own stem and head around two basic blocks, the second strided with a
    1×1 shortcut): inputs channels-last (b, H, W, 3) as the engine's data sets hold images."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, WIDTH, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.blocks = nn.Sequential(BasicBlock(WIDTH, WIDTH, 1), BasicBlock(WIDTH, 2 * WIDTH, 2))
        self.fc = nn.Linear(2 * WIDTH, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.stem(x.permute(0, 3, 1, 2))))  # (b, w, H, W)
        return self.fc(self.blocks(out).mean((2, 3)))  # (b, C)


def tiny_resnet(n_classes: int) -> TinyResNet:
    return TinyResNet(n_classes)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Class-coloured 8×8 RGB images (.npz) and the model's weights: random, with BatchNorm
    running statistics from train-mode passes over the data (far from their initial 0 / 1)."""
    folder = tmp_path_factory.mktemp("user-resnet")
    rng = np.random.default_rng(0)
    y = rng.integers(0, CLASSES, N_TRAIN + N_TEST)
    x = rng.uniform(0, 0.5, size=(len(y), SIDE, SIDE, 3))
    x[np.arange(len(y)), :, :, y] += 0.5  # class c brightens channel c
    np.savez(folder / "images.npz", X_train=x[:N_TRAIN], y_train=y[:N_TRAIN], X_test=x[N_TRAIN:],
             y_test=y[N_TRAIN:])
    torch.manual_seed(0)
    model = tiny_resnet(CLASSES)
    with torch.no_grad():
        for start in range(0, N_TRAIN, 50):
            model(torch.from_numpy(x[start : start + 50]).float())  # train mode: running statistics
    torch.save(model.state_dict(), folder / "w.pt")
    return folder / "images.npz", folder / "w.pt"


@pytest.fixture(scope="module")
def run(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    data, weights = files
    p = sum(t.numel() for t in tiny_resnet(CLASSES).parameters())
    return engine.build(str(data), SPEC, tmp_path_factory.mktemp("runs") / "user", weights=str(weights),
                        projection="kronecker", project=p, ihvp="fisher", dtype="float64",
                        progress=False)


def _reference(weights: Path, run: engine.Run, test_ids: list[int]) -> np.ndarray:
    """−G_train (F + λI)⁻¹ g_testᵀ (n, m) from vmap(grad) of the user model in eval mode, float64."""
    model = tiny_resnet(CLASSES).double()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(ps: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**ps, **buffers}, (xi[None],))  # (1, C)
        return nn.functional.cross_entropy(logits, yi[None])

    def grads(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([g[k].reshape(len(x), -1) for k in params], 1)  # (b, p)

    ds = run.dataset
    g_train = grads(torch.from_numpy(np.array(ds.x_train)), torch.from_numpy(np.array(ds.y_train)))
    g_test = grads(torch.from_numpy(np.array(ds.x_test[test_ids])), torch.from_numpy(np.array(ds.y_test[test_ids])))
    n, p = g_train.shape
    shift = run.config.weight_decay + run.config.damping
    h = g_train.T @ g_train / n + shift * torch.eye(p, dtype=torch.float64)  # (p, p)
    return -(g_train @ torch.linalg.solve(h, g_test.T)).numpy()  # (n, m)


def test_a_user_resnet_with_batchnorm_builds_explains_and_matches_a_reference(
        run: engine.Run, files: tuple[Path, Path]) -> None:
    _, weights = files
    module = run.model.objective.model
    assert isinstance(module, TinyResNet) and not module.training
    state = torch.load(weights, weights_only=True)
    assert not torch.allclose(state["bn.running_var"], torch.ones(WIDTH))  # non-trivial statistics
    torch.testing.assert_close(module.bn.running_mean, state["bn.running_mean"].double())
    projection = run.store.manifest["projection"]
    assert projection["kind"] == "kronecker" and run.store.space.dim == run.model.n_params
    assert run.info.raw["curvature"]["method"] == "fisher"

    out = run.explain(0, top=10)
    assert len(out["helpful"]) == len(out["harmful"]) == 10
    assert out["ihvp"]["method"] == "fisher"
    ids = [0, 1, 2]
    got = run.scores(ids)  # (n, 3)
    want = _reference(weights, run, ids)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    assert out["harmful"][0]["train_id"] == int(np.argmax(want[:, 0]))


def test_reopening_the_user_resnet_run_gives_the_same_scores(run: engine.Run) -> None:
    ids = [0, 5, 7]
    again = engine.open_run(run.path)
    np.testing.assert_array_equal(again.scores(ids), run.scores(ids))
    assert again.explain(3, top=10) == run.explain(3, top=10)
