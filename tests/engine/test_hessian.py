"""The dense Hessian's closed form for linear models, Newton training from the start, the lazy
spectrum of the exact solver and the preconditioned store of exact runs, each against the slower
path it replaces (HVP-assembled Hessians, L-BFGS, explicit solves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.config import BuildConfig, TrainConfig
from engine.distributed import Comm, LocalComm, reduced_hessian
from engine.ihvp import ExactSolver, data_hessian, dense_hessian, full_hessian, full_hvp, linear_hessian
from engine.ihvp import hessian as hessian_module
from engine.ihvp.hessian import linear_layer
from engine.models import make_module, make_objective
from engine.models import train as train_module
from engine.models.losses import cross_entropy
from engine.models.objective import Objective
from engine.models.train import lbfgs, objective_value_and_grad, train_convex

GRAD_TOL = TrainConfig().grad_tol

CPU = torch.device("cpu")


def _objective(model: str, d: int = 6, c: int = 3, **options: object) -> Objective:
    config = BuildConfig(data="x", model=model, **options)  # type: ignore[arg-type]
    module = make_module(config, input_shape=(d,), n_classes=c)
    return make_objective(module, config, device=CPU, dtype=torch.float64)


def _data(n: int = 90, d: int = 6, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    return x, y


def _hvp_hessian(obj: Objective, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hvp = full_hvp(obj, theta, x, y, shift=0.0, data_chunk=17, tangent_block=7)
    return dense_hessian(hvp, obj.n_params, dtype=torch.float64, device=CPU, block=13)


@pytest.mark.parametrize("model", ["logreg", "svm", "mlp"])
def test_dense_hessian_equals_the_hvp_assembled_one(model: str) -> None:
    obj = _objective(model, svm_temperature=0.5)
    x, y = _data()
    theta = 0.3 * torch.randn(obj.n_params, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    ref = _hvp_hessian(obj, theta, x, y)
    ours = data_hessian(obj, theta, x, y)
    assert (linear_layer(obj) is not None) == (model != "mlp")  # mlp keeps the HVP path
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    shifted = full_hessian(obj, theta, x, y, shift=0.25)
    torch.testing.assert_close(shifted, ref + 0.25 * torch.eye(obj.n_params, dtype=torch.float64),
                               rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_closed_form_in_small_sample_chunks_and_without_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _data(n=41, d=5, c=4)
    obj = _objective("logreg", d=5, c=4)
    theta = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _hvp_hessian(obj, theta, x, y)
    chunked = linear_hessian(obj, theta, x, y, budget=3 * 21)  # 3 samples per chunk
    torch.testing.assert_close(chunked, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    monkeypatch.setattr(hessian_module, "GATHER_ELEMENTS", 2 * obj.n_params + 1)  # 2 rows a gather
    blocks = linear_hessian(obj, theta, x, y)
    torch.testing.assert_close(blocks, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    torch.manual_seed(0)
    plain = Objective(nn.Sequential(nn.Flatten(), nn.Linear(5, 4, bias=False)), cross_entropy,
                      device=CPU, dtype=torch.float64)
    assert linear_layer(plain) is not None
    w = theta[: plain.n_params]
    ref = _hvp_hessian(plain, w, x, y)
    torch.testing.assert_close(linear_hessian(plain, w, x, y), ref, rtol=0,
                               atol=1e-12 * float(ref.abs().max()))


def test_only_flatten_then_linear_counts_as_linear() -> None:
    def make(*layers: nn.Module) -> Objective:
        return Objective(nn.Sequential(*layers), cross_entropy, device=CPU, dtype=torch.float64)

    assert linear_layer(make(nn.Linear(4, 3))) is not None
    assert linear_layer(make(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())) is None
    assert linear_layer(make(nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 3))) is None
    assert linear_layer(make(nn.Flatten(start_dim=0), nn.Linear(4, 3))) is None
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    frozen[1].bias.requires_grad_(False)  # θ is the weight alone, the bias a constant: HVPs
    assert linear_layer(make(*frozen)) is None


@pytest.mark.parametrize("scripted", [False, True])
def test_loss_value_and_grad_is_the_loss_and_its_gradient(scripted: bool) -> None:
    torch.manual_seed(0)
    module: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    if scripted:
        module = torch.jit.script(module)
    obj = Objective(module, cross_entropy, device=CPU, dtype=torch.float64)
    assert obj.functional is not scripted
    x, y = _data(n=30)
    theta = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    value, g = obj.loss_value_and_grad(theta, x, y)
    torch.testing.assert_close(value, obj.mean_loss(theta, x, y).detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(g, obj.loss_grad(theta, x, y), rtol=1e-13, atol=1e-15)


def test_newton_from_the_start_reaches_the_lbfgs_optimum() -> None:
    x, y = _data(n=120)
    lam = 1e-2
    obj = _objective("logreg")
    res = train_convex(obj, x, y, weight_decay=lam)
    assert res.iterations["lbfgs_evals"] == 0  # no L-BFGS (nor its torch._dynamo import)
    assert 0 < res.iterations["newton_steps"] <= 12
    assert res.grad_norm <= GRAD_TOL
    # reference: L-BFGS, then Newton steps with the HVP-assembled Hessian
    ref, _ = lbfgs(_objective("logreg"), torch.zeros(obj.n_params, dtype=torch.float64), x, y,
                    weight_decay=lam, steps=2000)
    for _ in range(5):
        _, g = objective_value_and_grad(obj, ref, x, y, weight_decay=lam)
        h = _hvp_hessian(obj, ref, x, y) + lam * torch.eye(obj.n_params, dtype=torch.float64)
        ref = ref - torch.linalg.solve(h, g)
    _, g = objective_value_and_grad(obj, ref, x, y, weight_decay=lam)
    assert float(g.norm()) <= GRAD_TOL
    torch.testing.assert_close(res.theta, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))


def test_newton_that_stalls_falls_back_to_lbfgs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "NEWTON_FROM_START", 1)
    monkeypatch.setattr(train_module, "CHORD_SHRINK", 0.0)  # no chord steps: one Newton step
    x, y = _data(n=120)
    msgs: list[str] = []
    res = train_convex(_objective("logreg"), x, y, weight_decay=1e-2, log=msgs.append)
    assert res.iterations["lbfgs_evals"] > 0
    assert res.grad_norm <= GRAD_TOL
    assert msgs[0].startswith("Newton from the start: 1 steps (+0") and msgs[1].startswith("L-BFGS")


class _TwoRanks(Comm):
    """A fake two-rank group whose other rank holds ``other`` (all_reduce adds it)."""

    world = 2

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.add_(self.other)


def test_reduced_hessian_is_the_weighted_sum_of_shards_plus_shift() -> None:
    obj = _objective("logreg")
    x, y = _data(n=100)
    theta = torch.randn(obj.n_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = full_hessian(obj, theta, x, y, shift=0.1)
    h0, h1 = data_hessian(obj, theta, x[:37], y[:37]), data_hessian(obj, theta, x[37:], y[37:])
    reduced = reduced_hessian(h0, weight=0.37, shift=0.1, comm=_TwoRanks(0.63 * h1))
    torch.testing.assert_close(reduced, full, rtol=0, atol=1e-13)
    one = reduced_hessian(data_hessian(obj, theta, x, y), weight=1.0, shift=0.1, comm=LocalComm())
    torch.testing.assert_close(one, full, rtol=0, atol=0)


def test_exact_solver_computes_the_spectrum_only_when_asked() -> None:
    a = torch.randn(20, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = a @ a.T + 0.5 * torch.eye(20, dtype=torch.float64)
    solver = ExactSolver(h)
    assert solver._evals is None  # a positive definite H needs only its Cholesky factor
    evals = torch.linalg.eigvalsh(h)
    s = solver.settings()
    assert s["min_eigenvalue"] == pytest.approx(float(evals[0]), rel=1e-12)
    assert s["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-12)
    assert solver.min_eigenvalue == s["min_eigenvalue"]


# ---------------------------------------------------------------- the preconditioned store
def _solve_path(run: engine.Run, damping: float | None = None) -> np.ndarray:
    """−G H⁻¹ Tᵀ by an explicit float64 solve with the run's (or a damped) Hessian."""
    h = run.solver("exact").hessian.double()
    if damping is not None:
        h = h + (damping - run.config.damping) * torch.eye(h.shape[0], dtype=torch.float64)
    g = run.store.resident.data.double()  # (n, d)
    t = run.queries.test_gradients(np.arange(run.n_test)).double()  # (m, d)
    return (-(g @ torch.linalg.solve(h, t.T))).numpy()


def test_exact_query_is_one_product_with_the_preconditioned_store(blobs_run: engine.Run) -> None:
    ref = _solve_path(blobs_run)
    a = blobs_run.queries.preconditioned()  # made now (else after n_train queried columns)
    assert a is not None and a.shape == blobs_run.store.resident.data.shape
    scores = blobs_run.scores()
    np.testing.assert_allclose(scores, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # the streaming solve path (what other methods and runs use) gives the same matrix
    s = blobs_run.solver().solve(blobs_run.queries.test_gradients(np.arange(blobs_run.n_test)).T.contiguous())
    streamed = torch.cat([-b for _, b in blobs_run.store.resident.products(s)]).numpy()
    np.testing.assert_allclose(scores, streamed, rtol=0, atol=1e-12 * np.abs(ref).max())
    cols = [3, 0, 3]
    np.testing.assert_allclose(blobs_run.scores(cols), ref[:, cols], rtol=0,
                               atol=1e-12 * np.abs(ref).max())


def test_the_preconditioned_store_is_made_once_n_train_columns_were_asked(blobs_npz: Path,
                                                                          tmp_path: Path) -> None:
    run = engine.build(str(blobs_npz), "logreg", tmp_path / "r", progress=False)
    ref = _solve_path(run)
    per_query = run.n_test  # 40 columns a query, n_train = 150
    for q in range(1, 5):
        np.testing.assert_allclose(run.scores(), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        assert (run.queries._precond is not None) == (q * per_query >= run.n_train), q
    run.scores(damping=0.3)  # other solvers neither count nor use it
    assert run.queries._exact_columns == 4 * per_query


def test_a_damping_override_scores_with_its_own_hessian(blobs_run: engine.Run) -> None:
    ref = _solve_path(blobs_run, damping=0.5)
    damped = blobs_run.scores(damping=0.5)
    np.testing.assert_allclose(damped, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    assert np.abs(damped - blobs_run.scores()).max() > 1e-3 * np.abs(ref).max()


def test_self_params_and_train_influence_agree_with_the_score_matrix(blobs_run: engine.Run) -> None:
    scores = blobs_run.scores()
    np.testing.assert_allclose(blobs_run.train_influence(5), scores[5], rtol=1e-10, atol=1e-14)
    h = blobs_run.solver("exact").hessian.double()
    g = blobs_run.store.resident.data.double()
    np.testing.assert_allclose(blobs_run.params(5), -torch.linalg.solve(h, g[5]).numpy(),
                               rtol=1e-10, atol=1e-14)
    self_ref = -(g * torch.linalg.solve(h, g.T).T).sum(1).numpy()
    np.testing.assert_allclose(blobs_run.self_influence(), self_ref, rtol=1e-10, atol=1e-14)


def test_no_preconditioned_store_for_other_runs(blobs_npz: Path, tmp_path: Path) -> None:
    cg = engine.build(str(blobs_npz), "logreg", tmp_path / "cg", ihvp="cg", progress=False)
    assert cg.queries.preconditioned() is None
    np.testing.assert_allclose(cg.scores([0, 1], ihvp="exact"), _solve_path(cg)[:, [0, 1]],
                               rtol=1e-10, atol=1e-14)
    half = engine.build(str(blobs_npz), "logreg", tmp_path / "f32", store_dtype="float32",
                        progress=False)
    assert half.queries.preconditioned() is None
    projected = engine.build(str(blobs_npz), "logreg", tmp_path / "p", ihvp="projected", project=8,
                             progress=False)
    assert projected.queries.preconditioned() is None
