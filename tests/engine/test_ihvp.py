"""The solvers against a dense float64 solve on random SPD matrices, and the HVP plumbing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine
from engine.config import CGConfig, LissaConfig
from engine.errors import SolverError
from engine.ihvp import BlockCG, ExactSolver, Lissa, dense_hessian, full_hvp, largest_eigenvalue
from tests.threads import run_in_threads


def _spd(p: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, np.log10(cond), p, dtype=torch.float64)
    return (q * evals) @ q.T


@pytest.mark.parametrize("m", [1, 7, 80])
def test_block_cg_solves_many_right_hand_sides(m: int) -> None:
    a = _spd(60, 1e3)
    b = torch.randn(60, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, prime=0))  # from scratch
    sol = solver.solve_report(b)
    np.testing.assert_allclose(sol.x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-7, atol=1e-9)
    assert torch.equal(solver.solve(b), sol.x)
    assert sol.diagnostics["converged"]
    assert sol.diagnostics["max_relative_residual"] <= 1e-10
    assert sol.diagnostics["hvps"] <= 60 + m  # the Krylov space never exceeds p (+ one block)


def test_block_cg_restarts_when_the_basis_is_capped() -> None:
    a = _spd(50, 1e2)
    b = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-9, max_dim=12, max_iter=500, prime=0))
    sol = solver.solve_report(b)
    np.testing.assert_allclose(sol.x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6, atol=1e-8)
    assert sol.diagnostics["restarts"] > 0


def test_block_cg_reports_non_convergence() -> None:
    a = _spd(80, 1e6)
    b = torch.randn(80, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-12, max_iter=3, prime=0))
    d = solver.solve_report(b).diagnostics
    assert d["converged"] is False
    assert d["max_relative_residual"] > 1e-12


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
    sol = solver.solve_report(b)
    np.testing.assert_allclose(sol.x.numpy(), exact.numpy(), rtol=1e-6, atol=1e-8)
    assert sol.diagnostics["converged"] and sol.diagnostics["bias_bound"] < 1e-9
    assert sol.diagnostics["steps"][0] < 5000  # stopped once the bound was met
    loose = Lissa(lambda v, idx: a @ v, n_train=10, config=LissaConfig(batch_size=10, tol=1e-2),
                  scale=scale, min_eigenvalue_bound=1.0)
    sol = loose.solve_report(b)
    err = (sol.x - exact).norm() / exact.norm()
    assert float(err) <= sol.diagnostics["bias_bound"] < 1e-2  # the bound bounds the error


def test_dense_hessian_matches_torch_func_hessian(blobs_run: engine.Run) -> None:
    """H from blocks of HVPs equals torch.func.hessian of the objective R plus damping."""
    run = blobs_run
    lam = run.config.weight_decay

    def objective(theta: torch.Tensor) -> torch.Tensor:
        return run.model.objective.mean_loss(theta, run.data.x_train, run.data.y_train) + 0.5 * lam * theta @ theta

    ref = torch.func.hessian(objective)(run.model.theta)
    hvp = full_hvp(run.model.objective, run.model.theta, run.data.x_train, run.data.y_train, shift=lam, data_chunk=37,
                   tangent_block=5)
    ours = dense_hessian(hvp, run.model.objective.n_params, dtype=torch.float64,
                         device=torch.device("cpu"), block=11)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_unknown_method_is_a_query_error(blobs_run: engine.Run) -> None:
    with pytest.raises(engine.QueryError, match="unknown ihvp method"):
        blobs_run.scores([0], ihvp="newton")
    with pytest.raises(engine.QueryError, match="--project"):
        blobs_run.scores([0], ihvp="projected")


def test_block_cg_in_float32_stops_at_working_precision() -> None:
    """A GPU run computes in float32, where the residual cannot reach the 1e-8 default: CG stops
    at its attainable accuracy (4·eps·‖H‖‖x‖/‖b‖ per column) instead of running all max_iter
    steps, reports converged and the tolerance it used, and float64 keeps 1e-8."""
    a = _spd(120, 1e2)
    b = torch.randn(120, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    solver = BlockCG(lambda v: a.float() @ v, CGConfig(max_iter=200, prime=0))
    sol = solver.solve_report(b.float())
    x, d = sol.x, sol.diagnostics
    assert d["converged"] and 1e-6 < d["tol_used"] < 1e-4
    assert d["max_relative_residual"] <= d["tol_used"]
    assert d["block_steps"] < 40  # 28 here; before the floor it ran until the space was exhausted
    want = torch.linalg.solve(a, b)
    assert float((x.double() - want).norm() / want.norm()) < 2e-5
    f64 = BlockCG(lambda v: a @ v, CGConfig(max_iter=200, prime=0))
    d64 = f64.solve_report(b).diagnostics
    assert d64["tol_used"] == 1e-8 and d64["converged"]


def test_a_float32_cg_run_converges(blobs_npz, tmp_path) -> None:
    """An MLP run in float32 (what a GPU run computes in) answers a CG query converged. Damped
    (δ = 1e-3), as a network's θ̂ asks: the bounded polish stops at ‖∇R‖ ≈ 2e-3, where H has a
    near-null, indefinite part that a float32 solve leaves unconverged (residual 2.4e-4 undamped)."""
    run = engine.build(str(blobs_npz), "mlp", tmp_path / "mlp32", device="cpu", ihvp="cg",
                       dtype="float32", damping=1e-3, progress=False)
    ref = engine.build(str(blobs_npz), "mlp", tmp_path / "mlp64", device="cpu", ihvp="cg",
                       dtype="float64", damping=1e-3, progress=False)
    got, want = run.scores([0, 1]), ref.scores([0, 1])
    d = run.explain(0)["ihvp"]["diagnostics"]
    assert d["converged"] and d["block_steps"] < 100, d
    # the two θ̂ differ a little (float32 and float64 training, a bounded polish): 0.996 measured
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_block_cg_on_a_singular_indefinite_operator_gives_the_minimum_norm_solution() -> None:
    """The projected matrix of an indefinite, rank-deficient H is not positive definite: the
    symmetric pseudo-inverse (the same on every device) gives the minimum-norm solution of the
    consistent system, like numpy's float64 pinv."""
    g = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.linspace(-3, -1, 10, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                       torch.linspace(1, 5, 25, dtype=torch.float64)])
    a = (q * evals) @ q.T
    b = a @ torch.randn(40, 2, generator=g, dtype=torch.float64)  # in the range of a
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10))
    sol = solver.solve_report(b)
    np.testing.assert_allclose(sol.x.numpy(), np.linalg.pinv(a.numpy()) @ b.numpy(), rtol=1e-7, atol=1e-9)
    assert sol.diagnostics["converged"]


def test_a_singular_float32_hessian_is_refused() -> None:
    """Singular to float32 precision (rank 150 of 200) is refused like a float64 one, not solved
    into a residual of 15."""
    g = torch.Generator().manual_seed(10)
    u = torch.randn(200, 150, generator=g, dtype=torch.float64)
    h = u @ u.T - 0.5 * torch.eye(200, dtype=torch.float64) * 0  # PSD, rank 150
    h = h - 1e-3 * (u[:, :1] @ u[:, :1].T)  # keeps it singular; Cholesky fails
    with pytest.raises(SolverError, match="singular"):
        ExactSolver(h.float())
    with pytest.raises(SolverError, match="singular"):
        ExactSolver(h)


def test_lissa_diagnostics_stay_finite_for_a_zero_column_in_float32() -> None:
    a = _spd(10, 5.0).float()
    b = torch.zeros(10, 2)
    b[:, 1] = 1.0
    solver = Lissa(lambda v, idx: a @ v, n_train=4, config=LissaConfig(depth=20, batch_size=4),
                   scale=10.0, min_eigenvalue_bound=1.0)
    assert np.isfinite(solver.solve_report(b).diagnostics["last_relative_change"])


@pytest.mark.parametrize("shift", [0.0, 3.5])
def test_the_explicit_inverse_solves_like_the_factorisation(shift: float) -> None:
    """The GPU's solve (one product with H⁻¹, made once) equals the triangular / eigen solve:
    positive definite (shift 0) and indefinite (shift 3.5)."""
    a = _spd(40, 1e3) - shift * torch.eye(40, dtype=torch.float64)
    b = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    plain, inverse = ExactSolver(a), ExactSolver(a, explicit_inverse=True)
    assert not plain.settings()["explicit_inverse"] and inverse.settings()["explicit_inverse"]
    want = torch.linalg.solve(a, b)
    for solver in (plain, inverse):
        sol = solver.solve_report(b)
        np.testing.assert_allclose(sol.x.numpy(), want.numpy(), rtol=1e-9, atol=1e-11)
        assert sol.diagnostics["max_relative_residual"] < 1e-11
    np.testing.assert_allclose(inverse.solve(b[:, 0]).numpy(), want[:, 0].numpy(), rtol=1e-9, atol=1e-11)


def _counted(a: torch.Tensor):
    calls = {"vectors": 0}

    def hvp(v: torch.Tensor) -> torch.Tensor:
        calls["vectors"] += v.shape[1]
        return a @ v

    return hvp, calls


@pytest.mark.parametrize("shift", [0.0, 2.0])  # positive definite, and indefinite (eigh Galerkin)
def test_a_primed_basis_answers_queries_with_few_hvps_and_no_history(shift: float) -> None:
    """The frozen start basis (32 seeded random columns solved once) makes every later query
    cheap, equal to a dense solve, and a function of the query alone: the same right-hand side
    gives the same bits whatever was solved before, and two solvers agree."""
    a = _spd(300, 1e4, seed=3) - shift * torch.eye(300, dtype=torch.float64)
    hvp, _calls = _counted(a)
    cfg = CGConfig(tol=1e-10)
    primed, plain = BlockCG(hvp, cfg), BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, prime=0))
    gen = torch.Generator().manual_seed(12)
    rhs = [torch.randn(300, 1, generator=gen, dtype=torch.float64) for _ in range(4)]
    answers = []
    for b in rhs:
        sol = primed.solve_report(b)
        x, d = sol.x, sol.diagnostics
        np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6, atol=1e-9)
        plain_d = plain.solve_report(b).diagnostics
        assert d["converged"] and d["start_basis_dim"] > 32
        assert d["hvps"] < 0.5 * plain_d["hvps"]
        answers.append(x)
    settings = primed.settings()
    assert settings["start_basis_dim"] == d["start_basis_dim"] and settings["priming_hvps"] > 0
    assert torch.equal(primed.solve(rhs[0]), answers[0])  # after three other queries
    other = BlockCG(lambda v: a @ v, cfg)
    assert torch.equal(other.solve(rhs[2]), answers[2])  # a fresh solver, another history


def test_the_start_basis_respects_its_budget_and_restarts_still_work() -> None:
    a = _spd(80, 30.0, seed=4)
    b = torch.randn(80, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    tiny = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, basis_mb=0))
    assert tiny.solve_report(b).diagnostics["start_basis_dim"] == 0 and "start_basis_dim" not in tiny.settings()
    capped = BlockCG(lambda v: a @ v, CGConfig(tol=1e-9, max_dim=20, max_iter=500, prime=8))
    sol = capped.solve_report(b)
    x, d = sol.x, sol.diagnostics
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6, atol=1e-9)
    assert d["converged"] and 8 <= d["start_basis_dim"] <= 20 and d["krylov_dim"] <= 20


def test_threads_share_one_primed_solver() -> None:
    """Threads race to the first solve: the basis is built once, and every answer equals the
    serial one bit for bit."""
    a = _spd(120, 1e3, seed=5)
    hvp, _calls = _counted(a)
    solver = BlockCG(hvp, CGConfig(tol=1e-10))
    gen = torch.Generator().manual_seed(14)
    rhs = [torch.randn(120, 1, generator=gen, dtype=torch.float64) for _ in range(24)]
    got: dict[int, torch.Tensor] = {}

    def worker(w: int) -> None:
        for i in range(w, 24, 4):
            got[i] = solver.solve(rhs[i])

    assert run_in_threads(worker, 4) == []
    assert solver.settings()["priming_hvps"] <= 120 + 32  # built once, not once per thread
    serial = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10))
    for i, b in enumerate(rhs):
        assert torch.equal(got[i], serial.solve(b))


def test_narrow_hvps_take_larger_data_chunks(digits_run: engine.Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """One tangent gets data chunks as large as the budget's sample × tangent pairs allow (fewer,
    larger calls), with the same products as fixed small chunks."""
    from engine.ihvp.hvp import work_blocks

    run = digits_run
    chunk, block = work_blocks(run.model.objective, run.data.x_train)
    calls = []
    real = run.model.objective.hvp
    monkeypatch.setattr(run.model.objective, "hvp", lambda *a: (calls.append(a[2].shape[0]), real(*a))[1])
    adaptive = full_hvp(run.model.objective, run.model.theta, run.data.x_train, run.data.y_train, shift=0.01)
    fixed = full_hvp(run.model.objective, run.model.theta, run.data.x_train, run.data.y_train, shift=0.01, data_chunk=100)
    gen = torch.Generator().manual_seed(15)
    for width in (1, 7):
        v = torch.randn(run.model.objective.n_params, width, generator=gen, dtype=torch.float64)
        calls.clear()
        got = adaptive(v)
        expected_chunk = min(run.n_train, chunk * block // width)
        assert max(calls) == expected_chunk and len(calls) == -(-run.n_train // expected_chunk)
        torch.testing.assert_close(got, fixed(v), rtol=1e-12, atol=1e-14)


def test_a_cg_run_primes_once_and_answers_reproducibly(blobs_npz, tmp_path) -> None:
    """A CG run's queries start from the primed basis: the same numbers for the same query
    whatever came before (the page, the API and an export agree), equal to the exact run."""
    run = engine.build(str(blobs_npz), "mlp", tmp_path / "cg", device="cpu", ihvp="cg", dtype="float64",
                       progress=False)
    first = run.scores([3])
    run.scores([0, 1, 2])
    assert np.array_equal(run.scores([3]), first)
    d = run.explain(3)["ihvp"]["diagnostics"]
    assert d["start_basis_dim"] > 0 and d["converged"]
    exact = run.scores([3], ihvp="exact")
    np.testing.assert_allclose(first, exact, rtol=1e-6, atol=1e-9 * np.abs(exact).max())


def test_the_start_basis_stays_within_its_budget_and_queries_within_max_dim() -> None:
    """The kept basis, T and its factor included, fits basis_mb and is trimmed to its vectors;
    a query's copy never grows past max_dim; prime_dim bounds the first query's priming."""
    from engine.ihvp.cg import _Basis

    a = _spd(400, 1e4, seed=6)
    budget_mb = 2
    solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, basis_mb=budget_mb, max_dim=600))
    b = torch.randn(400, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    x = solver.solve(b)
    kept = solver._start_basis
    assert kept is not None and kept.q.shape[1] == kept.k  # trimmed: no spare capacity kept
    assert kept.nbytes <= budget_mb << 20
    fits = _Basis.vectors_within(budget_mb << 20, 400, 8)  # 213 < max_dim / 2: the budget binds
    assert fits - 32 < kept.k <= fits < 300
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6, atol=1e-9)
    grown = []
    real_extend = _Basis.extend

    def spy(self, new, h_new):
        real_extend(self, new, h_new)
        grown.append(self.q.shape[1])

    import unittest.mock

    with unittest.mock.patch.object(_Basis, "extend", spy):
        solver.solve(torch.randn(400, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(17)))
    assert max(grown) <= 600
    small = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, prime_dim=64))
    small.solve(b)
    assert small.settings()["start_basis_dim"] <= 64


def test_a_failed_priming_leaves_cg_unprimed_not_broken() -> None:
    """Out of memory while priming (simulated: the HVP refuses blocks wider than 8): queries
    are answered without a start basis, and the settings say why."""
    a = _spd(60, 1e2, seed=7)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if v.shape[1] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return a @ v

    solver = BlockCG(hvp, CGConfig(tol=1e-10))
    b = torch.randn(60, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(18))
    for _ in range(2):
        sol = solver.solve_report(b)
        np.testing.assert_allclose(sol.x.numpy(), torch.linalg.solve(a, b).numpy(), rtol=1e-6)
        assert sol.diagnostics["start_basis_dim"] == 0
    assert "out of memory" in solver.settings()["priming_error"]


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_each_thread_gets_the_diagnostics_of_its_own_solve(method: str) -> None:
    """Two threads solve at once with one solver: each solve's report carries its own figures
    (an eigenvector converges in one step, a random vector takes many), equal to a serial solve's."""
    import threading

    a = _spd(50, 1e2, seed=8)
    _, vecs = torch.linalg.eigh(a)
    if method == "cg":
        solver = BlockCG(lambda v: a @ v, CGConfig(tol=1e-10, prime=0))
        key = "hvps"
    else:
        solver = Lissa(lambda v, idx: a @ v, n_train=4, config=LissaConfig(depth=30, batch_size=4),
                       scale=150.0, min_eigenvalue_bound=0.0)
        key = "last_relative_change"
    rhs = [vecs[:, -1:].contiguous(), torch.randn(50, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(19))]
    both_solved = threading.Barrier(2, timeout=30)
    seen: dict[int, object] = {}

    def worker(w: int) -> None:
        both_solved.wait()  # both solves run at once
        seen[w] = solver.solve_report(rhs[w]).diagnostics[key]

    assert run_in_threads(worker, 2) == []
    assert seen[0] != seen[1]
    assert [solver.solve_report(r).diagnostics[key] for r in rhs] == [seen[0], seen[1]]
