"""Scalable curvature against float64 dense references: the damped empirical Fisher of the store
(``FisherSolver``) and EK-FAC (``engine.ihvp.ekfac``, ``EKFACSolver``)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from types import SimpleNamespace

import pytest
import torch

from engine.errors import SolverError
from engine.ihvp import fisher as fisher_module
from engine.ihvp.ekfac import (
    DiagonalAccumulator,
    EKFACFactors,
    LambdaAccumulator,
    LayerBlock,
    factors_from_tensors,
    factors_to_tensors,
    fit_ekfac,
    layer_layout,
    rest_index,
    split_groups,
    unprojected_layout,
)
from engine.ihvp.ekfac_solver import EKFACSolver
from engine.ihvp.fisher import FisherSolver
from engine.store.resident import ResidentStore

F64 = torch.float64
Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name → (a (n, s, d_in), δ (n, s, d_out))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_data(n: int, s: int, d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and output gradients with distinct per-coordinate scales (well separated spectra)."""
    g = _gen(seed)
    a = torch.randn(n, s, d_in, generator=g, dtype=F64) * torch.linspace(0.3, 2.0, d_in, dtype=F64)
    delta = torch.randn(n, s, d_out, generator=g, dtype=F64) * torch.linspace(0.2, 1.5, d_out, dtype=F64)
    return a, delta


def _grads(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients vec(Σ_s δ_s a_sᵀ) (n, d_out·d_in), row-major: the independent path."""
    return torch.einsum("nso,nsi->noi", delta, a).reshape(a.shape[0], -1)


def _stream(layers: Layers, sizes: Iterable[int]) -> Callable[[], Iterable[tuple[str, torch.Tensor,
                                                                             torch.Tensor]]]:
    bounds = list(sizes)

    def batches() -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
        start = 0
        for size in bounds:
            for name, (a, delta) in layers.items():
                yield name, a[start : start + size], delta[start : start + size]
            start += size
    return batches


def _kron_basis(factors: EKFACFactors, name: str) -> torch.Tensor:
    f = factors.layers[name]
    return torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)  # row-major vec basis


def _dense_ekfac(factors: EKFACFactors, shift: float) -> torch.Tensor:
    """``Σ_layers (Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ`` (block-diagonal) + rest diagonal + shift·I."""
    h = torch.zeros(factors.dim, factors.dim, dtype=F64)
    for blk in factors.layout:
        k = _kron_basis(factors, blk.name)
        idx = blk.index()
        h[idx.unsqueeze(1), idx] = (k * factors.layers[blk.name].lambda_matrix.flatten()) @ k.T
    h[factors.rest, factors.rest] = factors.rest_diagonal
    return h + shift * torch.eye(factors.dim, dtype=F64)


# -- Fisher ---------------------------------------------------------------------------------------

def test_fisher_solver_equals_a_dense_solve_of_the_formula() -> None:
    rows = torch.randn(50, 30, generator=_gen(0), dtype=F64)
    b = torch.randn(30, 4, generator=_gen(1), dtype=F64)
    h = rows.T @ rows / 50 + 0.03 * torch.eye(30, dtype=F64)
    want = torch.linalg.solve(h, b)
    for source in (rows, lambda: rows.split(7), ResidentStore(rows, compute_dtype=F64)):
        solver = FisherSolver(source, weight_decay=0.01, damping=0.02)
        torch.testing.assert_close(solver.solve(b), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(solver.solve(b[:, 0]), want[:, 0], rtol=1e-10, atol=1e-12)
    sol = solver.solve_report(b)
    assert sol.diagnostics["max_relative_residual"] < 1e-12
    s, evals = solver.settings(), torch.linalg.eigvalsh(h)
    assert (s["n"], s["k"], s["shift"], s["spectrum"]) == (50, 30, pytest.approx(0.03), "exact")
    assert s["min_eigenvalue"] == pytest.approx(float(evals[0]), rel=1e-10)
    assert s["condition_number"] == pytest.approx(float(evals[-1] / evals[0]), rel=1e-10)


def test_fisher_of_a_float16_store_is_its_rounded_rows_in_float64() -> None:
    rows = torch.randn(300, 20, generator=_gen(2), dtype=F64).to(torch.float16)
    b = torch.randn(20, 3, generator=_gen(3), dtype=F64)
    exact = rows.to(F64)
    want = torch.linalg.solve(exact.T @ exact / 300 + 1e-3 * torch.eye(20, dtype=F64), b)
    store = ResidentStore(rows, compute_dtype=torch.float32)
    got = FisherSolver(store, damping=1e-3).solve(b)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)  # float64 accumulation: no fp32 loss


def test_fisher_spectrum_estimate_above_the_exact_size(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = torch.randn(40, 25, generator=_gen(4), dtype=F64) * torch.linspace(0.1, 3, 25, dtype=F64)
    monkeypatch.setattr(fisher_module, "EXACT_SPECTRUM_DIM", 10)
    s = FisherSolver(rows, damping=0.05).settings()
    evals = torch.linalg.eigvalsh(rows.T @ rows / 40 + 0.05 * torch.eye(25, dtype=F64))
    assert s["spectrum"] == "power-iteration estimate"
    assert s["max_eigenvalue"] == pytest.approx(float(evals[-1]), rel=1e-3)
    assert s["min_eigenvalue"] == pytest.approx(float(evals[0]), rel=1e-3)


def test_fisher_refuses_a_singular_undamped_fisher() -> None:
    with pytest.raises(SolverError, match="singular"):
        FisherSolver(torch.randn(5, 12, generator=_gen(5), dtype=F64))


# -- EK-FAC ---------------------------------------------------------------------------------------

def _two_layers(n: int = 40) -> tuple[Layers, tuple[LayerBlock, ...]]:
    """A layer with 3 positions (rotated first) and one with 60 (G formed first), a gap of two
    store coordinates between them and one after: dim = 20 + 2 + 18 + 1 = 41."""
    layers = {"conv.0": _layer_data(n, 3, 4, 5, seed=10), "fc": _layer_data(n, 60, 3, 6, seed=11)}
    layout = (LayerBlock("conv.0", 4, 5, 0), LayerBlock("fc", 3, 6, 22))
    return layers, layout


def _store_rows(layers: Layers, layout: tuple[LayerBlock, ...], dim: int, seed: int) -> torch.Tensor:
    n = next(iter(layers.values()))[0].shape[0]
    rows = torch.randn(n, dim, generator=_gen(seed), dtype=F64)  # the rest: other tracked params
    for blk in layout:
        rows[:, blk.index()] = _grads(*layers[blk.name])
    return rows


def _fit(layers: Layers, layout: tuple[LayerBlock, ...], dim: int, rows: torch.Tensor,
         sizes: Iterable[int], **kwargs: object) -> EKFACFactors:
    diag = DiagonalAccumulator(rest_index(layout, dim))
    diag.update(rows)
    return fit_ekfac(_stream(layers, sizes), layout, dim=dim, rest_diagonal=diag.diagonal(), **kwargs)


def test_ekfac_solve_equals_the_dense_float64_construction() -> None:
    layers, layout = _two_layers()
    rows = _store_rows(layers, layout, 41, seed=12)
    factors = _fit(layers, layout, 41, rows, [40])
    b = torch.randn(41, 5, generator=_gen(13), dtype=F64)
    h = _dense_ekfac(factors, shift=0.07)
    solver = EKFACSolver(factors, weight_decay=0.03, damping=0.04)
    torch.testing.assert_close(solver.solve(b), torch.linalg.solve(h, b), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.apply(b), h @ b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(solver.solve(b[:, 1]), torch.linalg.solve(h, b[:, 1]), rtol=1e-10,
                               atol=1e-12)
    assert solver.solve_report(b).diagnostics["max_relative_residual"] < 1e-12
    evals, s = torch.linalg.eigvalsh(h), solver.settings()
    assert (s["min_eigenvalue"], s["max_eigenvalue"]) == (pytest.approx(float(evals[0]), rel=1e-10),
                                                          pytest.approx(float(evals[-1]), rel=1e-10))
    assert s["shift"] == pytest.approx(0.07) and s["rest"] == 3
    assert [layer["positions"] for layer in s["layers"]] == [120, 2400]


def test_lambda_is_the_empirical_fisher_diagonal_in_the_kronecker_eigenbasis() -> None:
    layers, layout = _two_layers()
    rows = _store_rows(layers, layout, 41, seed=14)
    factors = _fit(layers, layout, 41, rows, [40])
    for blk in layout:
        a, delta = layers[blk.name]
        f = factors.layers[blk.name]
        # the bases are the eigenvectors of the position-averaged covariances
        for x, q, sig in ((a, f.activation_eigenvectors, f.activation_eigenvalues),
                          (delta, f.gradient_eigenvectors, f.gradient_eigenvalues)):
            flat = x.reshape(-1, x.shape[2])
            torch.testing.assert_close((flat.T @ flat / flat.shape[0]) @ q, q * sig, rtol=1e-10,
                                       atol=1e-12)
        g = _grads(a, delta)  # (n, d_out·d_in)
        fisher = g.T @ g / g.shape[0]  # the exact empirical Fisher of this layer
        k = _kron_basis(factors, blk.name)
        torch.testing.assert_close(f.lambda_matrix.flatten(), torch.diagonal(k.T @ fisher @ k),
                                   rtol=1e-10, atol=1e-12)
        assert float(f.lambda_matrix.sum()) == pytest.approx(float(torch.trace(fisher)), rel=1e-12)
    torch.testing.assert_close(factors.rest_diagonal, rows[:, factors.rest].square().mean(0))


def test_lambda_from_the_store_rows_equals_lambda_from_a_second_capture_pass() -> None:
    """fit_ekfac(rows=...) reads G_i from the store's blocks instead of a second model pass."""
    layers, layout = _two_layers()
    rows = _store_rows(layers, layout, 41, seed=15)
    two_pass = _fit(layers, layout, 41, rows, [40])
    diag = DiagonalAccumulator(rest_index(layout, 41))
    diag.update(rows)

    def from_store(blocks: tuple[torch.Tensor, ...]) -> EKFACFactors:
        return fit_ekfac(_stream(layers, [40]), layout, dim=41, rest_diagonal=diag.diagonal(),
                         rows=lambda: iter(blocks))

    from_rows = from_store((rows[:13], rows[13:]))
    for blk in layout:
        torch.testing.assert_close(from_rows.layers[blk.name].lambda_matrix,
                                   two_pass.layers[blk.name].lambda_matrix, rtol=1e-10, atol=1e-12)
        assert from_rows.layers[blk.name].num_samples == 40
    with pytest.raises(IndexError):
        from_store((rows[:, :30],))  # rows narrower than the layout


def test_independent_inputs_and_gradients_make_ekfac_the_exact_kronecker_fisher() -> None:
    """s = 1 and every (a_p, δ_q) pair once: the empirical Fisher is exactly S ⊗ A (row-major), so
    Λ = σ_S σ_Aᵀ and the EK-FAC solve is the dense solve of S ⊗ A + shift·I."""
    g = _gen(20)
    a_set = torch.randn(7, 4, generator=g, dtype=F64) + 0.5  # (P, d_in), non-centred
    d_set = torch.randn(6, 3, generator=g, dtype=F64)  # (Q, d_out)
    a = a_set.repeat_interleave(6, dim=0).unsqueeze(1)  # (P·Q, 1, d_in)
    delta = d_set.repeat(7, 1).unsqueeze(1)  # (P·Q, 1, d_out)
    layout = layer_layout([("fc", 3, 4)])
    factors = fit_ekfac(_stream({"fc": (a, delta)}, [11, 31]), layout)
    cov_a, cov_s = a_set.T @ a_set / 7, d_set.T @ d_set / 6
    sig_a, sig_s = torch.linalg.eigvalsh(cov_a), torch.linalg.eigvalsh(cov_s)
    torch.testing.assert_close(factors.layers["fc"].lambda_matrix, torch.outer(sig_s, sig_a),
                               rtol=1e-10, atol=1e-12)
    b = torch.randn(12, 2, generator=_gen(21), dtype=F64)
    want = torch.linalg.solve(torch.kron(cov_s, cov_a) + 1e-2 * torch.eye(12, dtype=F64), b)
    torch.testing.assert_close(EKFACSolver(factors, damping=1e-2).solve(b), want, rtol=1e-9, atol=1e-11)


def test_streaming_over_batches_equals_one_batch() -> None:
    layers, layout = _two_layers(n=45)
    rows = _store_rows(layers, layout, 41, seed=15)
    whole = _fit(layers, layout, 41, rows, [45])
    streamed = _fit(layers, layout, 41, rows, [1, 5, 17, 22])
    for blk in layout:
        w, s = whole.layers[blk.name], streamed.layers[blk.name]
        for key in ("activation_eigenvalues", "gradient_eigenvalues", "lambda_matrix"):
            torch.testing.assert_close(getattr(s, key), getattr(w, key), rtol=1e-10, atol=1e-12)
        assert (s.num_samples, s.num_positions) == (w.num_samples, w.num_positions)
    # Λ over chunks of 2 samples inside each batch: the same sums
    bases = {blk.name: (whole.layers[blk.name].activation_eigenvectors,
                        whole.layers[blk.name].gradient_eigenvectors) for blk in layout}
    chunked = LambdaAccumulator(bases, chunk_elements=2 * 4 * 5)
    for name, a, delta in _stream(layers, [45])():
        chunked.update(name, a, delta)
    for blk in layout:
        torch.testing.assert_close(chunked.lambda_matrix(blk.name),
                                   whole.layers[blk.name].lambda_matrix, rtol=1e-12, atol=1e-14)


def test_float32_inputs_accumulate_within_a_stated_tolerance() -> None:
    layers, layout = _two_layers()
    rows = _store_rows(layers, layout, 41, seed=16)
    ref = EKFACSolver(_fit(layers, layout, 41, rows, [40]), damping=0.05)
    low = {name: (a.float(), d.float()) for name, (a, d) in layers.items()}
    b = torch.randn(41, 3, generator=_gen(17), dtype=F64)
    want = ref.solve(b)
    for dtype in (F64, torch.float32):  # measured 1e-8 and 3e-8: float32 rounding of inputs, products
        factors = _fit(low, layout, 41, rows.float(), [7, 33], dtype=dtype)
        assert factors.layers["fc"].lambda_matrix.dtype == F64  # the sums stay float64
        err = (EKFACSolver(factors, damping=0.05).solve(b) - want).norm() / want.norm()
        assert float(err) < 1e-6


def test_factors_survive_a_tensor_round_trip() -> None:
    layers = {"": _layer_data(12, 2, 3, 4, seed=30), "block.1.conv": _layer_data(12, 5, 2, 3, seed=31)}
    layout = layer_layout([("", 3, 4), ("block.1.conv", 2, 3)])
    factors = fit_ekfac(_stream(layers, [12]), layout)
    buf = io.BytesIO()
    torch.save(factors_to_tensors(factors), buf)
    buf.seek(0)
    back = factors_from_tensors(torch.load(buf))
    assert back.layout == factors.layout and back.dim == 18
    b = torch.randn(18, 2, generator=_gen(32), dtype=F64)
    assert torch.equal(EKFACSolver(back, damping=0.1).solve(b), EKFACSolver(factors, damping=0.1).solve(b))


def test_ekfac_in_the_kronecker_projected_space() -> None:
    """Fed ã = P_inᵀa and δ̃ = P_outᵀδ, Λ is the Fisher diagonal of P_outᵀ G_i P_in."""
    a, delta = _layer_data(30, 4, 6, 8, seed=40)
    p_in = torch.randn(8, 3, generator=_gen(41), dtype=F64)
    p_out = torch.randn(6, 2, generator=_gen(42), dtype=F64)
    factors = fit_ekfac(_stream({"fc": (a @ p_in, delta @ p_out)}, [30]), layer_layout([("fc", 2, 3)]))
    g = torch.einsum("nso,nsi->noi", delta, a)  # (n, d_out, d_in) the full gradients
    proj = (p_out.T @ g @ p_in).reshape(30, -1)  # (n, k_out·k_in)
    k = _kron_basis(factors, "fc")
    torch.testing.assert_close(factors.layers["fc"].lambda_matrix.flatten(),
                               torch.diagonal(k.T @ (proj.T @ proj / 30) @ k), rtol=1e-10, atol=1e-12)


def test_unprojected_layers_with_bias_and_groups() -> None:
    """The unprojected store holds a layer's weight (g·d_out, d_in) row-major, then its bias
    (g·d_out,): one block per group whose last column (the bias) lives apart."""
    n, s, g, d_out, d_in = 20, 3, 2, 3, 4
    gen = _gen(60)
    a = torch.cat([torch.randn(n, s, g, d_in, generator=gen, dtype=F64),
                   torch.ones(n, s, g, 1, dtype=F64)], 3)  # (n, s, g, d_in + 1)
    delta = torch.randn(n, s, g, d_out, generator=gen, dtype=F64)  # (n, s, g, d_out)
    layer = SimpleNamespace(name="conv", offset=2, d_out=d_out, d_in=d_in, groups=g, bias=True)
    blocks = torch.einsum("bsgo,bsgi->bgoi", delta, a)  # (n, g, d_out, d_in + 1)
    rows = torch.randn(n, 33, generator=gen, dtype=F64)  # 2 + 24 weights + 6 biases + 1
    rows[:, 2:26] = blocks[..., :d_in].reshape(n, -1)  # weight.view(C_out, -1), groups stacked
    rows[:, 26:32] = blocks[..., -1].reshape(n, -1)  # bias
    layout = unprojected_layout([layer])
    assert [blk.name for blk in layout] == ["conv#0", "conv#1"]
    for j, blk in enumerate(layout):
        assert torch.equal(rows[:, blk.index()], blocks[:, j].reshape(n, -1))
    assert rest_index(layout, 33).tolist() == [0, 1, 32]

    def batches() -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
        for rows_in in (slice(0, 7), slice(7, n)):  # raw 4-D captures, split per group
            yield from split_groups("conv", a[rows_in], delta[rows_in])
    diag = DiagonalAccumulator(rest_index(layout, 33))
    diag.update(rows)
    factors = fit_ekfac(batches, layout, dim=33, rest_diagonal=diag.diagonal())
    for j, blk in enumerate(layout):
        grads = blocks[:, j].reshape(n, -1)
        k = _kron_basis(factors, blk.name)
        torch.testing.assert_close(factors.layers[blk.name].lambda_matrix.flatten(),
                                   torch.diagonal(k.T @ (grads.T @ grads / n) @ k), rtol=1e-10, atol=1e-12)
    b = torch.randn(33, 4, generator=_gen(61), dtype=F64)
    solver = EKFACSolver(factors, damping=0.02)
    torch.testing.assert_close(solver.solve(b), torch.linalg.solve(_dense_ekfac(factors, 0.02), b),
                               rtol=1e-10, atol=1e-12)
    back = factors_from_tensors(factors_to_tensors(factors))
    assert back.layout == layout and torch.equal(EKFACSolver(back, damping=0.02).solve(b), solver.solve(b))


def test_ekfac_refuses_bad_input() -> None:
    layout = layer_layout([("fc", 3, 4)])
    a, delta = _layer_data(5, 1, 3, 4, seed=50)
    with pytest.raises(ValueError, match="d = 4"):
        fit_ekfac(_stream({"fc": (a[..., :3], delta)}, [5]), layout)
    with pytest.raises(ValueError, match="outside every layer block"):
        fit_ekfac(_stream({"fc": (a, delta)}, [5]), layout, dim=14)
    zero = fit_ekfac(_stream({"fc": (a, torch.zeros_like(delta))}, [5]), layout)
    with pytest.raises(SolverError, match="damping"):
        EKFACSolver(zero)  # Λ = 0 and no shift
