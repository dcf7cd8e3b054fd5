"""Exact scores against an independent float64 NumPy computation (closed-form softmax
regression: its own Newton training, per-sample gradients and Hessian)."""

from __future__ import annotations

import numpy as np
import pytest

import engine


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _reference(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, lam: float, c: int):
    """θ = [W (c, d) row-major, b (c,)] as nn.Linear lists them; returns θ̂, I_up,loss (n, m)."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])  # (n, d+1)
    eye = np.eye(c)[y]  # (n, c)

    def unpack(theta: np.ndarray) -> np.ndarray:  # → (c, d+1) with the bias as last column
        return np.hstack([theta[: c * d].reshape(c, d), theta[c * d :, None]])

    def pack(m: np.ndarray) -> np.ndarray:
        return np.concatenate([m[:, :d].ravel(), m[:, d]])

    def grad_hess(theta: np.ndarray):
        p = _softmax(xa @ unpack(theta).T)  # (n, c)
        g = pack((p - eye).T @ xa / n) + lam * theta
        h = np.zeros((c * (d + 1),) * 2)
        for i in range(n):
            a = np.diag(p[i]) - np.outer(p[i], p[i])  # (c, c)
            block = np.kron(a, np.outer(xa[i], xa[i]))  # indices (class, feature)
            # reorder (class, feature) → θ's layout: weights class-major, then biases
            h += block
        perm = np.array([k * (d + 1) + j for k in range(c) for j in range(d)]
                        + [k * (d + 1) + d for k in range(c)])
        h = h[np.ix_(perm, perm)] / n + lam * np.eye(len(theta))
        return g, h

    theta = np.zeros(c * (d + 1))
    for _ in range(50):
        g, h = grad_hess(theta)
        if np.linalg.norm(g) < 1e-13:
            break
        theta -= np.linalg.solve(h, g)
    _, h = grad_hess(theta)

    def sample_grads(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        xs_a = np.hstack([xs, np.ones((len(xs), 1))])
        r = _softmax(xs_a @ unpack(theta).T) - np.eye(c)[ys]  # (m, c)
        return np.stack([pack(np.outer(r[i], xs_a[i])) for i in range(len(xs))])

    gtr, gte = sample_grads(x, y), sample_grads(xt, yt)
    return theta, -(gtr @ np.linalg.solve(h, gte.T))


@pytest.fixture(scope="module")
def reference(blobs_run: engine.Run):
    ds = blobs_run.dataset
    return _reference(ds.x_train, ds.y_train, ds.x_test, ds.y_test, 1e-2, ds.n_classes)


def test_training_reaches_the_reference_optimum(blobs_run: engine.Run, reference) -> None:
    theta_ref, _ = reference
    assert blobs_run.info.training["grad_norm"] < 1e-8
    np.testing.assert_allclose(blobs_run.model.theta.numpy(), theta_ref, rtol=1e-7, atol=1e-9)


def test_exact_scores_match_float64_reference(blobs_run: engine.Run, reference) -> None:
    _, ref = reference
    ours = blobs_run.scores(ihvp="exact")
    assert ours.shape == ref.shape
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= 0.9999
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-6
    big = np.abs(ref) > 1e-3 * np.abs(ref).max()  # elementwise where not vanishing
    assert (np.abs(ours - ref)[big] / np.abs(ref)[big]).max() <= 1e-3


@pytest.mark.parametrize(("method", "threshold"), [("cg", 0.999999), ("lissa", 0.98)])
def test_iterative_solvers_agree_with_exact(blobs_run: engine.Run, reference, method: str,
                                            threshold: float) -> None:
    _, ref = reference
    ours = blobs_run.scores(ihvp=method)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] >= threshold
    report = blobs_run.explain(0, ihvp=method)["ihvp"]
    assert report["method"] == method and report["diagnostics"]["converged"] is True


def test_cg_reports_a_small_true_residual(blobs_run: engine.Run) -> None:
    diag = blobs_run.explain(0, ihvp="cg")["ihvp"]["diagnostics"]
    assert diag["max_relative_residual"] <= 1e-8
    assert diag["hvps"] <= blobs_run.model.objective.n_params  # block Krylov: never more than p


def test_self_influence_is_the_diagonal(blobs_run: engine.Run, reference) -> None:
    """I(z_i, z_i) from run.self_influence equals the diagonal of the train-as-test scores."""
    _, _ = reference
    g = blobs_run.store.resident.data  # (n, p)
    full = -(g @ blobs_run.solver("exact").solve(g.T.contiguous())).numpy()
    np.testing.assert_allclose(blobs_run.self_influence(), np.diag(full), rtol=1e-10)
    assert (blobs_run.self_influence() < 0).all()  # −gᵀH⁻¹g with H positive definite


def test_params_influence_predicts_parameter_change(blobs_run: engine.Run) -> None:
    """−H⁻¹g_i/n is the first-order change of θ̂ when z_i is removed (within O(1/n²))."""
    from engine.validate import retrain_convex

    i = 7
    keep = np.ones(blobs_run.n_train, dtype=bool)
    keep[i] = False
    new = retrain_convex(blobs_run.model.objective, blobs_run.model.theta, blobs_run.data.x_train[keep],
                          blobs_run.data.y_train[keep], lam=1e-2, newton=blobs_run.solver("exact"))
    actual = (new - blobs_run.model.theta).numpy()
    predicted = -blobs_run.params(i) / blobs_run.n_train
    assert np.corrcoef(actual, predicted)[0, 1] > 0.99
    assert np.linalg.norm(actual - predicted) < 0.2 * np.linalg.norm(actual)  # n = 150: O(1/n) terms
