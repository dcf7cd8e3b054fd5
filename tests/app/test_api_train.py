"""REST routes about training points: one point, the test points it moves most, and the
self-influence ranking that the mislabel review pages through."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

import engine

from .conftest import N_TEST, N_TRAIN


def test_train_point_self_influence_and_rank(client: TestClient, run: engine.Run) -> None:
    s = run.self_influence()
    order = np.argsort(-np.abs(s), kind="stable")
    for i in (int(order[0]), int(order[17]), 0):
        body = client.get(f"/api/v1/train-points/{i}").json()
        assert body["train_id"] == i and body["label"] == int(run.dataset.y_train[i])
        assert body["self_influence"] == pytest.approx(s[i], rel=1e-12)
        assert body["rank"] == int(np.flatnonzero(order == i)[0]) + 1
        proba = run.predict_proba(run.dataset.x_train[i : i + 1])[0]
        assert body["predicted"] == int(proba.argmax()) and body["probabilities"] == pytest.approx(proba)
        assert body["n_train"] == N_TRAIN
    assert client.get(f"/api/v1/train-points/{int(order[0])}").json()["rank"] == 1


def test_self_influence_is_minus_g_hinv_g(client: TestClient, run: engine.Run) -> None:
    """Independent of the engine's self-influence path: −gᵀH⁻¹g by a NumPy float64 dense solve."""
    h = run.solver("exact").hessian.cpu().double().numpy()  # (p, p)
    g = run.store.resident.data.cpu().double().numpy()  # (n, p) data-loss gradients
    want = -np.einsum("ij,ij->i", g, np.linalg.solve(h, g.T).T)
    got = [client.get(f"/api/v1/train-points/{i}").json()["self_influence"] for i in (1, 2, 3)]
    np.testing.assert_allclose(got, want[1:4], rtol=1e-8)


def test_train_point_influence_is_a_row_of_the_scores(client: TestClient, run: engine.Run) -> None:
    i, k = 11, 4
    body = client.get(f"/api/v1/train-points/{i}/influence", params={"top": k}).json()
    row = run.scores()[i]  # (n_test,) I_up,loss(z_i, z_test)
    order = np.argsort(row, kind="stable")
    assert [r["test_id"] for r in body["helpful"]] == order[:k].tolist()
    assert [r["test_id"] for r in body["harmful"]] == order[::-1][:k].tolist()
    for r in body["helpful"] + body["harmful"]:
        assert r["score"] == pytest.approx(row[r["test_id"]], rel=1e-9, abs=1e-12)
        assert r["label"] == int(run.dataset.y_test[r["test_id"]])
    everything = client.get(f"/api/v1/train-points/{i}/influence", params={"top": 500}).json()
    assert len(everything["helpful"]) == len(everything["harmful"]) == N_TEST  # capped at n_test


def test_self_influence_ranking_pages(client: TestClient, run: engine.Run) -> None:
    s = run.self_influence()
    order = np.argsort(-np.abs(s), kind="stable")
    first = client.get("/api/v1/self-influence", params={"top": 10}).json()
    second = client.get("/api/v1/self-influence", params={"top": 10, "offset": 10}).json()
    assert first["total"] == N_TRAIN and first["ihvp"] == "exact"
    items = first["items"] + second["items"]
    assert [r["train_id"] for r in items] == order[:20].tolist()
    assert [r["rank"] for r in items] == list(range(1, 21))
    mags = [abs(r["self_influence"]) for r in items]
    assert mags == sorted(mags, reverse=True)
    proba = run.predict_proba(run.dataset.x_train)
    for r in items:
        assert r["label"] == int(run.dataset.y_train[r["train_id"]])
        assert r["predicted"] == int(proba[r["train_id"]].argmax())
    tail = client.get("/api/v1/self-influence", params={"top": 50, "offset": N_TRAIN - 3}).json()
    assert len(tail["items"]) == 3 and tail["items"][-1]["rank"] == N_TRAIN


def test_self_influence_ranks_planted_mislabels_first(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Flip 5 labels of a clean problem: the flips lead the ranking the review page shows."""
    from fastapi.testclient import TestClient as Client

    from app.main import create_app
    from app.settings import Settings

    from .conftest import write_image_npz

    path = write_image_npz(tmp_path_factory.mktemp("flip") / "d.npz", seed=3)
    with np.load(path) as z:
        data = dict(z)
    flips = np.array([3, 20, 41, 60, 77])
    data["y_train"][flips] = (data["y_train"][flips] + 1) % 3
    np.savez(path, **data)
    out = tmp_path_factory.mktemp("runs") / "flip"
    engine.build(str(path), "logreg", out, device="cpu", progress=False)
    with Client(create_app(Settings(run=out))) as c:
        top = c.get("/api/v1/self-influence", params={"top": 8}).json()["items"]
    assert set(flips) <= {r["train_id"] for r in top}


@pytest.mark.parametrize("url, status", [
    (f"/api/v1/train-points/{N_TRAIN}", 404), ("/api/v1/train-points/-1", 404),
    (f"/api/v1/train-points/{N_TRAIN}/influence", 404), ("/api/v1/train-points/x", 422),
    ("/api/v1/train-points/0/influence?top=0", 422), ("/api/v1/self-influence?top=0", 422),
    ("/api/v1/self-influence?offset=-2", 422), ("/api/v1/self-influence?top=5000", 422),
])
def test_train_routes_bad_input(client: TestClient, url: str, status: int) -> None:
    r = client.get(url)
    assert r.status_code == status, url
    assert r.json()["detail"]


@pytest.mark.parametrize("by", ["loss", "grad_norm"])
def test_mislabel_baselines_rank_and_ride_along(client: TestClient, run: engine.Run, by: str) -> None:
    proba = run.predict_proba(run.dataset.x_train)
    loss = -np.log(proba[np.arange(N_TRAIN), run.dataset.y_train])  # cross-entropy, independently
    norm = np.linalg.norm(run.store.resident.data.cpu().double().numpy(), axis=1)
    body = client.get("/api/v1/self-influence", params={"top": 15, "by": by}).json()
    assert body["by"] == by
    values = loss if by == "loss" else norm
    assert [r["train_id"] for r in body["items"]] == np.argsort(-values, kind="stable")[:15].tolist()
    for r in body["items"]:
        assert r["train_loss"] == pytest.approx(loss[r["train_id"]], rel=1e-9)
        assert r["grad_norm"] == pytest.approx(norm[r["train_id"]], rel=1e-9)
    point = client.get("/api/v1/train-points/3").json()
    assert point["train_loss"] == pytest.approx(loss[3], rel=1e-9)


def test_params_per_layer(client: TestClient, run: engine.Run) -> None:
    body = client.get("/api/v1/train-points/6/params").json()
    vec = run.params(6)  # (p,) I_up,params
    assert [layer["name"] for layer in body["layers"]] == run.model.objective.names
    parts = np.split(vec, np.cumsum(run.model.objective.numels)[:-1])
    for layer, part in zip(body["layers"], parts):
        assert layer["numel"] == part.size
        assert layer["norm"] == pytest.approx(np.linalg.norm(part), rel=1e-10)
        assert layer["max_abs"] == pytest.approx(np.abs(part).max(), rel=1e-10)
    assert body["norm"] == pytest.approx(np.linalg.norm(vec), rel=1e-10)
    assert sum(layer["share"] for layer in body["layers"]) == pytest.approx(1.0)
    assert client.get(f"/api/v1/train-points/{N_TRAIN}/params").status_code == 404


def test_trust_route_before_and_after_a_check(client: TestClient, run: engine.Run) -> None:
    from engine.trust import TRUST_FILE, trust_check

    (run.path / TRUST_FILE).unlink(missing_ok=True)
    before = client.get("/api/v1/trust").json()
    assert before["checked"] is False and "influence trust" in before["how"]
    report = trust_check(run, test_index=[0, 1], top=3, methods=["exact"])
    after = client.get("/api/v1/trust").json()
    assert after["checked"] is True and after["pairs"] == report["pairs"]
    assert after["best"]["method"] == "exact" and after["best"]["pearson"] > 0.95
