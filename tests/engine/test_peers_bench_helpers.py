"""The pure helpers of bench/peers_bench.py (sign/scale conversion, agreement metrics) on tiny
closed-form cases; needs only NumPy (the peer libraries are not installed for the test suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "peers_bench.py"
_spec = importlib.util.spec_from_file_location("peers_bench", _PATH)
assert _spec is not None and _spec.loader is not None
pb = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("peers_bench", pb)  # dataclasses look their module up there
_spec.loader.exec_module(pb)


def _closed_form() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A 3-parameter quadratic case: H (mean-loss Hessian + λI), train grads G (n, p), test grads T."""
    rng = np.random.default_rng(0)
    n, p, m, lam = 5, 3, 2, 0.1
    a = rng.normal(size=(p, p))
    h_mean = a @ a.T / p  # PSD "mean loss" Hessian
    h = h_mean + lam * np.eye(p)
    g = rng.normal(size=(n, p))
    t = rng.normal(size=(m, p))
    return h, g, t, np.array([n, lam])


def test_pydvl_and_captum_conventions_convert_to_ours() -> None:
    h, g, t, (n, lam) = _closed_form()
    n = int(n)
    ours = -(g @ np.linalg.solve(h, t.T))  # I = −g_testᵀ H⁻¹ g_i, (n_train, n_test)
    pydvl_raw = t @ np.linalg.solve(h, g.T)  # +g_testᵀ (H_mean + λI)⁻¹ g_i, (n_test, n_train)
    h_sum = n * (h - lam * np.eye(h.shape[0]))  # Σ_i ∇²L_i of the summed loss
    captum_raw = t @ np.linalg.solve(h_sum + n * lam * np.eye(h.shape[0]), g.T)  # hessian_reg = nλ
    np.testing.assert_allclose(pb.to_ours(ours, "ours", n), ours)
    np.testing.assert_allclose(pb.to_ours(pydvl_raw, "pydvl", n), ours, rtol=1e-12)
    np.testing.assert_allclose(pb.to_ours(captum_raw, "captum", n), ours, rtol=1e-12)
    with pytest.raises(ValueError, match="training rows"):
        pb.to_ours(pydvl_raw.T, "pydvl", n)  # wrong layout is refused, not silently transposed


def test_agreement_of_exact_and_of_flipped_scores() -> None:
    h, g, t, _ = _closed_form()
    ours = -(g @ np.linalg.solve(h, t.T))
    same = pb.agreement(ours, ours, k=2)
    assert same["pearson"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["top2_harmful"] == 1.0 and same["top2_helpful"] == 1.0
    assert same["rel_error"] == 0.0 and same["fitted_scale"] == pytest.approx(1.0)
    flipped = pb.agreement(-ours, ours, k=2)  # the sign error the conversion check must catch
    assert flipped["pearson"] == pytest.approx(-1.0) and flipped["spearman"] == pytest.approx(-1.0)
    assert flipped["rel_error"] == pytest.approx(2.0) and flipped["fitted_scale"] == pytest.approx(-1.0)
    halved = pb.agreement(0.5 * ours, ours, k=2)  # a scale error: rank metrics blind, these not
    assert halved["spearman"] == pytest.approx(1.0)
    assert halved["rel_error"] == pytest.approx(0.5) and halved["fitted_scale"] == pytest.approx(2.0)


def test_rank_metrics_against_hand_computed_values() -> None:
    np.testing.assert_array_equal(pb.rankdata(np.array([10.0, 20.0, 20.0, 5.0])), [2.0, 3.5, 3.5, 1.0])
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 4.0, 9.0, 16.0])  # monotone, not linear
    assert pb.spearman(a, b) == pytest.approx(1.0)
    # Pearson of (1,2,3,4) and (1,4,9,16) = 25 / sqrt(5 · 129) by hand
    xc, yc = a - a.mean(), b - b.mean()
    assert pb.pearson(a, b) == pytest.approx(float(xc @ yc / np.sqrt((xc @ xc) * (yc @ yc))))
    assert pb.pearson(a, b) == pytest.approx(25 / np.sqrt(5 * 129))


def test_topk_overlap_counts_harmful_and_helpful_separately() -> None:
    exact = np.array([[5.0, -1.0], [4.0, -2.0], [3.0, 9.0], [-7.0, 8.0], [-8.0, -9.0]])  # (5 train, 2 test)
    approx = exact.copy()
    approx[:, 0] = [4.0, 5.0, 3.0, -8.0, -7.0]  # column 0: same top-2 and bottom-2 sets, order swapped
    approx[:, 1] = [-1.0, 9.0, 8.0, -9.0, -2.0]  # column 1: harmful {1, 2} vs {2, 3}; helpful {3, 4} vs {4, 1}
    top = pb.topk_overlap(approx, exact, k=2)
    assert top["harmful"] == pytest.approx((1.0 + 0.5) / 2)
    assert top["helpful"] == pytest.approx((1.0 + 0.5) / 2)
