"""The reliability routes (app/routes/quality.py): LDS, mislabel check and brittleness as background
jobs with progress, their saved results, ``/api/v1/reliability`` and the overview's panel, on the
package's small logreg run (90 train / 30 test) and on one built with recorded label flips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.optimize import minimize
from scipy.special import logsumexp
from scipy.stats import spearmanr

import engine
from app.main import create_app
from app.settings import Settings
from app.views import lds_view
from engine.brittle import BRITTLE_FILE
from engine.lds import LDS_FILE, load_lds, subset_masks
from engine.mislabel import MISLABEL_FILE

from .conftest import N_TEST, N_TRAIN, write_image_npz
from .test_jobs import _wait

TINY = {"subsets": 3, "tests": 5}


@pytest.fixture(scope="module")
def clean(run_path: Path) -> Iterator[None]:
    """No saved results before this module's tests, and none after (other modules share the run)."""
    names = (LDS_FILE, MISLABEL_FILE, BRITTLE_FILE)
    for name in names:
        (run_path / name).unlink(missing_ok=True)
    yield
    for name in names:
        (run_path / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- LDS
def test_lds_job_reports_progress_and_is_saved(client: TestClient, run: engine.Run, clean: None) -> None:
    assert client.get("/api/v1/lds").json() == {"results": []}
    r = client.post("/api/v1/lds", json={**TINY, "output": "margin"})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["url"])
    assert job["status"] == "done" and job["kind"] == "lds", job["error"]
    assert job["progress"] == {"done": 3, "total": 3}  # one step per retrained subset
    out = job["result"]
    assert out["subsets"] == 3 and out["fraction"] == 0.5 and out["output"] == "margin"
    assert out["ihvp"] == run.default_method.value and out["retraining"] == "scratch"
    assert len(out["test_ids"]) == 5 == len(out["per_test"]) and out["n_train"] == N_TRAIN
    lo, hi = out["ci95"]
    assert lo <= out["lds"] <= hi and -1 <= lo and hi <= 1
    saved = client.get("/api/v1/lds").json()["results"]
    assert saved == load_lds(run) and saved[-1]["lds"] == out["lds"]
    # the same request shares the finished job instead of retraining
    again = client.post("/api/v1/lds", json={**TINY, "output": "margin"})
    assert again.status_code == 202 and again.json()["id"] == r.json()["id"]


def _fit_logreg(x: np.ndarray, y: np.ndarray, *, n_classes: int, weight_decay: float) -> np.ndarray:
    """θ = (W (C, d), b (C,)) minimising mean cross-entropy + (λ/2)‖θ‖², by SciPy's L-BFGS in float64."""
    n, d = x.shape
    onehot = np.eye(n_classes)[y]  # (n, C)

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        W, b = w[: n_classes * d].reshape(n_classes, d), w[n_classes * d :]
        z = x @ W.T + b  # (n, C)
        lse = logsumexp(z, axis=1)  # (n,)
        p = np.exp(z - lse[:, None])  # (n, C)
        value = float((lse - z[np.arange(n), y]).mean() + weight_decay / 2 * w @ w)
        g = (p - onehot) / n  # (n, C)
        return value, np.concatenate([(g.T @ x).ravel(), g.sum(axis=0)]) + weight_decay * w

    w0 = np.zeros(n_classes * (d + 1))
    return minimize(objective, w0, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "maxiter": 5000}).x


def test_lds_agrees_with_an_independent_computation(client: TestClient, run: engine.Run,
                                                    clean: None) -> None:
    """The served LDS is the mean Spearman, over test points, of the subsets' summed scores with
    the test losses of logistic regressions refitted here (SciPy, float64) on the same subsets."""
    job = _wait(client, client.post("/api/v1/lds", json={**TINY, "seed": 4}).json()["url"])
    out = job["result"]
    assert job["status"] == "done", job["error"]
    ids = out["test_ids"]
    masks = subset_masks(run.n_train, subsets=3, fraction=0.5, seed=4)  # (3, n); the engine's seeded subsets
    ds, c = run.dataset, run.dataset.n_classes
    x, xt = ds.x_train.reshape(run.n_train, -1), ds.x_test[ids].reshape(len(ids), -1)  # (n, d), (T, d)
    d = x.shape[1]
    losses = []
    for mask in masks:
        w = _fit_logreg(x[mask], ds.y_train[mask], n_classes=c, weight_decay=run.config.weight_decay)
        z = xt @ w[: c * d].reshape(c, d).T + w[c * d :]  # (T, C)
        losses.append(logsumexp(z, axis=1) - z[np.arange(len(ids)), ds.y_test[ids]])
    predicted = masks.astype(np.float64) @ run.scores(ids)  # (3, T): Σ_{i∈S} I(z_i, z_t)
    actual = np.array(losses)  # (3, T)
    rho = np.array([spearmanr(predicted[:, t], actual[:, t]).statistic for t in range(len(ids))])
    assert out["lds"] == pytest.approx(np.nanmean(rho), abs=1e-9)
    assert out["per_test"] == pytest.approx([None if np.isnan(v) else v for v in rho], abs=1e-9)


@pytest.mark.parametrize("body", [
    {"subsets": 1}, {"subsets": 10_000}, {"fraction": 0}, {"fraction": 1.0}, {"tests": 0},
    {"output": "accuracy"}, {"retraining": "hot"}, {"seed": -1}, {"damping": -1.0},
    {"test_ids": []}, {"subset": 3}, {"ihvp": "newton"}, {"tests": N_TEST + 1},
    {"fraction": 0.001},  # round(0.001 · 90) = 0 points per subset
    {"ihvp": "ekfac"},  # not built for this run
])
def test_lds_bad_requests_are_422(client: TestClient, body: dict[str, Any]) -> None:
    r = client.post("/api/v1/lds", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


def test_lds_unknown_test_id_is_404(client: TestClient) -> None:
    r = client.post("/api/v1/lds", json={**TINY, "test_ids": [0, N_TEST]})
    assert r.status_code == 404 and str(N_TEST) in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- brittleness
def test_brittleness_job(client: TestClient, run: engine.Run, clean: None) -> None:
    r = client.post("/api/v1/brittleness", json={"test_ids": [0, 1], "max_k": 8})
    assert r.status_code == 202, r.text
    job = _wait(client, r.json()["url"])
    assert job["status"] == "done", job["error"]
    assert job["progress"]["done"] >= 1 and job["progress"]["total"] >= job["progress"]["done"]
    results = job["result"]["results"]
    assert [t["test_id"] for t in results] == [0, 1]
    for t in results:
        assert t["k"] is None or 1 <= t["k"] <= t["max_k"] <= 8
    saved = client.get("/api/v1/reliability").json()["brittleness"]
    assert saved["results"] == results and saved["summary"]["n_tests"] == 2


@pytest.mark.parametrize("body, status", [
    ({"tests": 0}, 422), ({"tests": 10_000}, 422), ({"max_k": 0}, 422), ({"test_ids": [N_TEST]}, 404),
    ({"ihvp": "nope"}, 422), ({"k": 3}, 422),
])
def test_brittleness_bad_requests(client: TestClient, body: dict[str, Any], status: int) -> None:
    r = client.post("/api/v1/brittleness", json=body)
    assert r.status_code == status, r.text
    assert r.json()["detail"]


# ---------------------------------------------------------------------------------------------- mislabels
def test_mislabel_check_refused_without_label_flips(client: TestClient) -> None:
    for body in (None, {}):
        r = client.post("/api/v1/mislabels/check", json=body)
        assert r.status_code == 422 and "--label-noise" in r.json()["detail"]


@pytest.fixture(scope="module")
def noisy_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A run of the same data with 10% of its training labels flipped (recorded)."""
    npz = write_image_npz(tmp_path_factory.mktemp("noisy-data") / "images.npz")
    out = tmp_path_factory.mktemp("noisy-runs") / "logreg"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False, label_noise=0.1)
    with TestClient(create_app(Settings(run=out))) as c:
        yield c


def test_mislabel_check_job_and_panel(noisy_client: TestClient) -> None:
    rel = noisy_client.get("/api/v1/reliability").json()
    assert rel["mislabel"] is None and rel["label_noise"]["n_flipped"] == 9
    assert "mislabel-none" not in noisy_client.get("/").text  # the run has flips: the check is offered
    r = noisy_client.post("/api/v1/mislabels/check", json={"ihvp": "cg"})
    assert r.status_code == 202, r.text
    job = _wait(noisy_client, r.json()["url"])
    assert job["status"] == "done" and job["progress"] == {"done": 3, "total": 3}, job["error"]
    out = job["result"]
    assert out["n_flipped"] == 9 and out["ihvp"] == "cg"
    assert [s["score"] for s in out["scores"]] == ["self_influence", "loss", "grad_norm"]
    assert all(0.0 <= s["auc"] <= 1.0 and set(s["recall"]) == {"1", "5", "10", "20"} for s in out["scores"])
    assert noisy_client.get("/api/v1/reliability").json()["mislabel"] == out
    page = noisy_client.get("/")
    table = page.text.split('class="numbers mislabel-table"')[1].split("</table>")[0]
    for s in out["scores"]:
        assert f"{s['auc']:.3f}" in table and s["score"].replace("_", " ") in table


# ---------------------------------------------------------------------------------------------- reliability and page
def test_reliability_shape(client: TestClient, run: engine.Run, clean: None) -> None:
    rel = client.get("/api/v1/reliability").json()
    assert set(rel) >= {"trust", "lds", "mislabel", "brittleness", "label_noise", "commands"}
    assert rel["trust"] == client.get("/api/v1/trust").json()
    assert rel["lds"] == load_lds(run) and rel["mislabel"] is None
    assert rel["label_noise"] == {"fraction": 0.0, "n_flipped": 0}
    assert rel["commands"]["lds"] == f"influence lds --run {run.path}"


def test_overview_panel_shows_saved_lds(client: TestClient, run: engine.Run, clean: None) -> None:
    if not load_lds(run):
        _wait(client, client.post("/api/v1/lds", json=TINY).json()["url"])
    r = client.get("/")
    assert r.status_code == 200 and r.template.name == "overview.html"  # type: ignore[attr-defined]
    rows = r.context["rv"]["lds"]["rows"]  # type: ignore[attr-defined]
    assert rows == lds_view(load_lds(run))["rows"]
    panel = r.text.split('id="lds"')[1].split("</section>")[0]
    best = rows[0]
    assert f"{best['lds']:.3f}" in panel and f"{best['ci95'][0]:.3f}–{best['ci95'][1]:.3f}" in panel
    assert '<td class="lds-retraining scratch" title="each subset retrained to the optimum' in panel
    assert ">to the optimum</td>" in panel  # a logreg is retrained to its optimum: labelled so
    assert "≈ 0.54" in panel and "≈ 0.02–0.05" in panel  # published references
    assert f"influence lds --run {run.path}" in panel and 'data-job-url="/api/v1/lds"' in panel
    assert "mislabel-none" in r.text and "--label-noise 0.1" in r.text  # built without flips


def test_lds_view_orders_and_scales() -> None:
    base = {"subsets": 3, "fraction": 0.5, "output": "loss", "retraining": "warm", "ground_truth": "g",
            "test_ids": [0, 1], "model": "mlp"}
    view = lds_view([{**base, "ihvp": "cg", "lds": 0.2, "ci95": [-0.1, 0.4]},
                     {**base, "ihvp": "exact", "lds": 0.9, "ci95": [0.85, 0.95]},
                     {**base, "ihvp": "lissa", "lds": None, "ci95": [None, None]}])
    assert [r["ihvp"] for r in view["rows"]] == ["exact", "cg", "lissa"]
    assert view["best"]["ihvp"] == "exact" and view["rows"][2]["bar"] is None
    assert view["rows"][0]["bar"] == {"left": 85.0, "width": 10.0, "mean": 90.0}
    assert view["rows"][1]["bar"]["left"] == 0.0 and view["rows"][1]["bar"]["width"] == 40.0  # clipped at 0
    assert view["rows"][0]["retraining_text"] == "warm-started from θ̂"


def test_unreadable_saved_results_are_reported_not_raised(client: TestClient, run_path: Path,
                                                          clean: None) -> None:
    (run_path / LDS_FILE).write_text('{"no results": 1}')
    (run_path / BRITTLE_FILE).write_text("{not json")
    try:
        r = client.get("/api/v1/lds")
        assert r.status_code == 400 and "malformed" in r.json()["detail"]
        rel = client.get("/api/v1/reliability").json()
        assert rel["lds"] == [] and rel["brittleness"] is None and set(rel["errors"]) == {"lds", "brittleness"}
        page = client.get("/")
        assert page.status_code == 200
        assert "The saved LDS results cannot be read" in page.text
        assert "The saved brittleness search cannot be read" in page.text
    finally:
        (run_path / LDS_FILE).unlink()
        (run_path / BRITTLE_FILE).unlink()
