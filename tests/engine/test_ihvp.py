"""The solvers against a dense float64 solve on random SPD matrices, and the HVP plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine.config import CGConfig, LissaConfig
from engine.errors import SolverError
from engine.ihvp import BlockCG, ExactSolver, Lissa, dense_hessian, full_hvp, largest_eigenvalue


def _spd(p: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, np.log10(cond), p, dtype=torch.float64)
    return (q * evals) @ q.T


@pytest.mark.parametrize("m", [1, 7, 80])
def test_block_cg_solves_many_right_hand_sides(m: int) -> None:
    a = _spd(60, 1e3)
    b = torch.randn(60, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10))
    x = solver.solve(b)
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-7, atol=1e-9)
    assert solver.diagnostics["converged"]
    assert solver.diagnostics["max_relative_residual"] <= 1e-10
    assert solver.diagnostics["hvps"] <= 60 + m  # the Krylov space never exceeds p (+ one block)


def test_block_cg_restarts_when_the_basis_is_capped() -> None:
    a = _spd(50, 1e2)
    b = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-9, max_dim=12, max_iter=500))
    x = solver.solve(b)
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6, atol=1e-8)
    assert solver.diagnostics["restarts"] > 0


def test_block_cg_reports_non_convergence() -> None:
    a = _spd(80, 1e6)
    b = torch.randn(80, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-12, max_iter=3))
    solver.solve(b)
    assert solver.diagnostics["converged"] is False
    assert solver.diagnostics["max_relative_residual"] > 1e-12


def test_exact_solver_cholesky_and_indefinite_fallback() -> None:
    a = _spd(30, 10.0)
    b = torch.randn(30, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    s = ExactSolver(a)
    assert s.settings()["factorisation"] == "cholesky"
    np.testing.assert_allclose(s.solve(b).numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-10)
    indefinite = a - 3.5 * torch.eye(30, dtype=torch.float64)  # some eigenvalues < 0, none 0
    s2 = ExactSolver(indefinite)
    assert s2.settings()["positive_definite"] is False
    np.testing.assert_allclose(s2.solve(b).numpy(), torch.linalg.solve(indefinite, b).numpy(),
                               rtol=1e-8, atol=1e-10)
    with pytest.raises(SolverError, match="singular"):
        ExactSolver(torch.zeros(5, 5, dtype=torch.float64))


def test_lissa_full_batch_converges_to_the_solve() -> None:
    a = _spd(20, 20.0)
    b = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    scale = 1.25 * largest_eigenvalue(lambda v: a @ v, 20, dtype=torch.float64,
                                      device=torch.device("cpu"))
    assert scale == pytest.approx(1.25 * 20.0, rel=1e-3)
    exact = torch.linalg.solve(a, b)
    solver = Lissa(lambda v, idx: a @ v, n_train=10,
                   config=LissaConfig(depth=5000, batch_size=10, tol=1e-9), scale=scale,
                   min_eigenvalue_bound=1.0)
    np.testing.assert_allclose(solver.solve(b).numpy(), exact.numpy(), rtol=1e-6, atol=1e-8)
    assert solver.diagnostics["converged"] and solver.diagnostics["bias_bound"] < 1e-9
    assert solver.diagnostics["steps"][0] < 5000  # stopped once the bound was met
    loose = Lissa(lambda v, idx: a @ v, n_train=10, config=LissaConfig(batch_size=10, tol=1e-2),
                  scale=scale, min_eigenvalue_bound=1.0)
    err = (loose.solve(b) - exact).norm() / exact.norm()
    assert float(err) <= loose.diagnostics["bias_bound"] < 1e-2  # the bound bounds the error


def test_dense_hessian_matches_torch_func_hessian(blobs_run: engine.Run) -> None:
    """H from blocks of HVPs equals torch.func.hessian of the objective R plus damping."""
    run = blobs_run
    lam = run.config.weight_decay

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return run.objective.mean_loss(theta, run.x_train, run.y_train) + 0.5 * lam * theta @ theta

    ref = torch.func.hessian(objective)(run.theta)
    hvp = full_hvp(run.objective, run.theta, run.x_train, run.y_train, shift=lam, data_chunk=37,
                   tangent_block=5)
    ours = dense_hessian(hvp, run.objective.n_params, dtype=torch.float64,
                         device=torch.device("cpu"), block=11)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_unknown_method_is_a_query_error(blobs_run: engine.Run) -> None:
    with pytest.raises(engine.QueryError, match="unknown ihvp method"):
        blobs_run.scores([0], ihvp="newton")
    with pytest.raises(engine.QueryError, match="--project"):
        blobs_run.scores([0], ihvp="projected")
