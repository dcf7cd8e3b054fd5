"""Training the linear ``svm`` on the true hinge loss (Koh & Liang 2017, §4.1).

The objective is the contract's ``R(θ) = (1/n) Σ_i Σ_c max(0, 1 − s_ic) + (λ/2)‖θ‖²`` with
one-vs-rest margins ``s_ic = ±f_c(x_i)`` (+ for the true class) and θ = every weight and bias.
It separates into one binary SVM per class, ``½‖θ_c‖² + C Σ_i max(0, 1 − y_ic θ_cᵀ[x_i; 1])``
with ``C = 1/(nλ)``, which liblinear's dual coordinate descent (scikit-learn's ``LinearSVC``,
hinge loss, the bias as a regularised feature of value 1) solves to its optimum. The hinge has
no Hessian: influence is computed through the smooth hinge at this θ̂ (``losses.smooth_hinge``).

Optimality is reported as the norm of the smallest subgradient of R at θ̂ (the KKT residual):
points strictly inside the margin contribute their full subgradient, points on it any fraction
of it, found by a small bounded least-squares problem per class.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["LIBLINEAR_TOL", "from_flat", "hinge_kkt_residual", "hinge_objective", "to_flat",
           "train_hinge_svm"]

LIBLINEAR_TOL = 1e-9  # tighter stalls liblinear without lowering the objective (measured on digits)
MARGIN_EPS = 1e-6  # |1 − s| below this counts as on the margin


def _augment(x: np.ndarray) -> np.ndarray:
    return np.hstack([x.reshape(len(x), -1), np.ones((len(x), 1))])  # (n, d + 1)


def _signs(y: np.ndarray, n_classes: int) -> np.ndarray:
    return np.where(y[:, None] == np.arange(n_classes), 1.0, -1.0)  # (n, C)


def train_hinge_svm(x: np.ndarray, y: np.ndarray, *, n_classes: int, weight_decay: float,
                    seed: int = 0) -> np.ndarray:
    """θ̂ as (C, d + 1): row c is class c's weights then its bias (float64)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    flat = x.reshape(len(x), -1).astype(np.float64)
    c_reg = 1.0 / (len(x) * weight_decay)
    theta = np.zeros((n_classes, flat.shape[1] + 1))
    for c in range(n_classes):
        labels = np.where(y == c, 1, -1)
        svc = LinearSVC(loss="hinge", C=c_reg, tol=LIBLINEAR_TOL, max_iter=1_000_000,
                        intercept_scaling=1.0, dual=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svc.fit(flat, labels)
        theta[c, :-1] = svc.coef_[0]
        theta[c, -1] = svc.intercept_[0]
    return theta


def hinge_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, *, weight_decay: float) -> float:
    margins = _signs(y, theta.shape[0]) * (_augment(x) @ theta.T)  # (n, C)
    return float(np.maximum(0.0, 1.0 - margins).sum(axis=1).mean() + 0.5 * weight_decay * (theta**2).sum())


def hinge_kkt_residual(theta: np.ndarray, x: np.ndarray, y: np.ndarray, *, weight_decay: float,
                       iters: int = 3000) -> float:
    """‖smallest subgradient of R at θ‖ (0 at the exact optimum)."""
    xa, n = _augment(x), len(x)
    signs = _signs(y, theta.shape[0])
    margins = signs * (xa @ theta.T)
    total = 0.0
    for c in range(theta.shape[0]):
        inside = margins[:, c] < 1.0 - MARGIN_EPS
        on = np.abs(margins[:, c] - 1.0) <= MARGIN_EPS
        g0 = weight_decay * theta[c] - (signs[inside, c, None] * xa[inside]).sum(axis=0) / n  # (d+1,)
        a = (signs[on, c, None] * xa[on]).T / n  # (d+1, m): subtracting a @ α, α ∈ [0, 1]
        alpha = np.zeros(a.shape[1])
        if a.shape[1]:  # accelerated projected gradient (FISTA) on ½‖g0 − aα‖², α ∈ [0, 1]
            step = 1.0 / max(np.linalg.norm(a, 2) ** 2, 1e-300)
            z, t = alpha.copy(), 1.0
            for _ in range(iters):
                nxt = np.clip(z + step * (a.T @ (g0 - a @ z)), 0.0, 1.0)
                if np.dot(z - nxt, nxt - alpha) > 0.0:  # adaptive restart (O'Donoghue & Candès)
                    t = 1.0
                t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
                z = nxt + ((t - 1.0) / t_next) * (nxt - alpha)
                alpha, t = nxt, t_next
        total += float(np.sum((g0 - a @ alpha) ** 2))
    return float(np.sqrt(total))


def to_flat(theta: np.ndarray) -> np.ndarray:
    """(C, d + 1) rows → θ (p,) in the linear layer's ``named_parameters()`` order: weight, bias."""
    return np.concatenate([theta[:, :-1].reshape(-1), theta[:, -1]])


def from_flat(flat: np.ndarray, n_classes: int) -> np.ndarray:
    w, b = flat[: -n_classes].reshape(n_classes, -1), flat[-n_classes:]
    return np.hstack([w, b[:, None]])
