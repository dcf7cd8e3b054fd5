"""Per-sample gradients (vmap vs a loop), the projection, the TorchScript path and top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.config import ModelKind, TrainConfig
from engine.grads.per_sample import per_sample_grads, per_sample_grads_loop
from engine.grads.projection import ROW_BLOCK, Projector
from engine.models.losses import make_loss, smooth_hinge
from engine.models.objective import Objective
from engine.models.zoo import build_model
from engine.query.topk import naive_topk, streaming_topk

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", [ModelKind.LOGREG, ModelKind.SVM, ModelKind.MLP, ModelKind.CNN])
def test_vmap_per_sample_grads_match_a_loop(kind: ModelKind) -> None:
    torch.manual_seed(0)
    shape = (6, 5, 2)  # (H, W, C) image so every model applies
    model = build_model(kind, input_shape=shape, n_classes=4, train=TrainConfig(), seed=0)
    obj = Objective(model, make_loss(kind.value, svm_temperature=0.1), device=CPU,
                    dtype=torch.float64)
    theta = torch.randn(obj.n_params, dtype=torch.float64) * 0.3
    x = torch.randn(23, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (23,))
    fast = per_sample_grads(obj, theta, x, y, chunk_size=7)
    np.testing.assert_allclose(fast.numpy(), per_sample_grads_loop(obj, theta, x, y).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_smooth_hinge_tends_to_the_hinge() -> None:
    logits = torch.tensor([[2.0, -0.5, 0.3], [0.1, 0.9, -3.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    sign = -torch.ones_like(logits)
    sign[torch.arange(2), y] = 1
    hinge = torch.clamp(1 - sign * logits, min=0).sum(1).mean()
    assert float(smooth_hinge(logits, y, temperature=1e-4)) == pytest.approx(float(hinge), abs=1e-3)
    assert float(smooth_hinge(logits, y, temperature=1.0)) > float(hinge)


def test_projection_is_seeded_blocked_and_consistent() -> None:
    p, k = ROW_BLOCK + 300, 16  # two row blocks
    proj = Projector(p, k, seed=3, dtype=torch.float64, device=CPU)
    g = torch.randn(5, p, dtype=torch.float64)
    full = proj.columns(slice(0, k))  # (p, k) materialised only for the test
    np.testing.assert_allclose(proj.project(g).numpy(), (g @ full).numpy(), rtol=1e-12)
    again = Projector(p, k, seed=3, dtype=torch.float64, device=CPU).columns(slice(4, 9))
    np.testing.assert_array_equal(again.numpy(), full[:, 4:9].numpy())
    other = Projector(p, k, seed=4, dtype=torch.float64, device=CPU).columns(slice(0, k))
    assert not torch.equal(other, full)
    assert float(full.pow(2).sum(0).mean()) == pytest.approx(p / k, rel=0.05)  # N(0, 1/K) entries


def test_projected_run_with_k_equal_p_reproduces_exact(blobs_npz: Path, blobs_run: engine.Run,
                                                       tmp_path: Path) -> None:
    p = blobs_run.model.objective.n_params
    proj = engine.build(str(blobs_npz), "logreg", tmp_path / "proj", ihvp="projected", project=p,
                        progress=False)
    assert proj.store.resident.data.shape == (blobs_run.n_train, p)
    np.testing.assert_allclose(proj.scores([0, 5]), blobs_run.scores([0, 5]), rtol=1e-6, atol=1e-9)
    small = engine.build(str(blobs_npz), "logreg", tmp_path / "proj8", ihvp="projected", project=8,
                         progress=False)
    assert small.store.resident.data.shape == (blobs_run.n_train, 8)
    corr = np.corrcoef(small.scores([0]).ravel(), blobs_run.scores([0]).ravel())[0, 1]
    assert 0.3 < corr < 1.0  # a sketch: correlated, not exact
    with pytest.raises(engine.QueryError, match="projected"):
        small.params(0)


def test_torchscript_user_model_gives_the_builtin_scores(blobs_npz: Path, blobs_run: engine.Run,
                                                         tmp_path: Path) -> None:
    """The autograd path (TorchScript) and the torch.func path agree on the same θ̂."""
    model = build_model(ModelKind.LOGREG, input_shape=blobs_run.dataset.input_shape, n_classes=3,
                        train=TrainConfig(), seed=0).double()
    blobs_run.model.objective.load_flat(blobs_run.model.theta)
    model.load_state_dict(blobs_run.model.objective.model.state_dict())
    path = tmp_path / "model.pt"
    torch.jit.script(model).save(str(path))
    user = engine.build(str(blobs_npz), str(path), tmp_path / "user", progress=False, dtype="float64")
    assert user.info.model.kind.value == "user"
    assert user.info.training["trained"] is False
    assert user.info.training["grad_norm"] < 1e-8
    np.testing.assert_allclose(user.scores([1, 2]), blobs_run.scores([1, 2]), rtol=1e-8, atol=1e-10)


def test_streaming_topk_matches_full_sort() -> None:
    scores = torch.randn(1000, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    blocks = ((s, scores[s : s + 97]) for s in range(0, 1000, 97))
    v, i = streaming_topk(blocks, 10, largest=True)
    rv, ri = naive_topk(scores, 10, largest=True)
    np.testing.assert_array_equal(i.numpy(), ri.numpy())
    np.testing.assert_array_equal(v.numpy(), rv.numpy())
    blocks = ((s, scores[s : s + 3]) for s in range(0, 1000, 3))
    v, i = streaming_topk(blocks, 4, largest=False)
    np.testing.assert_array_equal(i.numpy(), naive_topk(scores, 4, largest=False)[1].numpy())


def test_explain_orders_helpful_and_harmful(blobs_run: engine.Run) -> None:
    e = blobs_run.explain(4, top=5)
    col = blobs_run.scores([4])[:, 0]
    assert [r["train_id"] for r in e["helpful"]] == list(np.argsort(col, kind="stable")[:5])
    assert [r["train_id"] for r in e["harmful"]] == list(np.argsort(-col, kind="stable")[:5])
    assert all(r["label"] == int(blobs_run.dataset.y_train[r["train_id"]]) for r in e["helpful"])
    np.testing.assert_allclose([r["score"] for r in e["harmful"]], np.sort(col)[::-1][:5])
