"""Every API route on a small ResNet run (issue 13): digits, a width-4 ResNet trained for two epochs,
its per-sample gradients Kronecker-projected to K = 64 in float32, with EK-FAC factors (so both
``fisher`` and ``ekfac`` are offered) and nothing that needs full gradients. The Fisher scores
are checked against a float64 dense solve of the stored rows."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.main import create_app
from app.settings import Settings

K = 64
N_TRAIN, N_TEST, N_CLASSES = 300, 60, 10
METHODS = ["fisher", "ekfac"]
FULL_ONLY = ["exact", "cg", "lissa"]  # solvers that need full gradients (a Hessian-vector product)
TOP = 5


def build_resnet_run(out: Path) -> Path:
    """The small ResNet run of issue 13 (about 20 s on two CPU cores)."""
    engine.build("digits", "resnet", out, project=K, projection="kronecker", ihvp="ekfac",
                 train=engine.TrainConfig(epochs=2, width=4, polish_s=0), train_size=N_TRAIN,
                 test_size=N_TEST, device="cpu", progress=False)
    return out


def upload_png() -> bytes:
    """A light vertical bar on black, 16×16 (resized to the run's 8×8)."""
    img = Image.new("L", (16, 16), 0)
    img.paste(255, (6, 2, 10, 14))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def resnet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_resnet_run(tmp_path_factory.mktemp("runs") / "digits-resnet")


@pytest.fixture(scope="module")
def client(resnet_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(run=resnet_path))) as c:
        yield c


@pytest.fixture(scope="module")
def run(client: TestClient) -> engine.Run:
    """The run the app opened in its lifespan (its caches are the ones the routes fill)."""
    return client.app.state.run  # type: ignore[attr-defined,no-any-return]


def get_ok(client: TestClient, path: str, **params: object) -> dict:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_offers_fisher_and_ekfac(client: TestClient) -> None:
    body = get_ok(client, "/api/v1/health")
    assert body["status"] == "ok" and body["model"] == "resnet"
    assert (body["n_train"], body["n_test"]) == (N_TRAIN, N_TEST)
    assert body["ihvp"] == "ekfac"
    assert sorted(body["methods"]) == sorted(METHODS)


def test_summary_describes_the_kronecker_store(client: TestClient, run: engine.Run) -> None:
    body = get_ok(client, "/api/v1/summary")
    assert body["store"] == {"kind": "kronecker", "k": K, "dtype": "float32"}
    n_params = run.model.theta.numel()  # every parameter is tracked
    assert body["n_params"] == n_params
    assert body["tracked"] == {"patterns": None, "n_params": n_params, "n_params_all": n_params}
    assert len(body["confusion"]) == N_CLASSES and sum(map(sum, body["confusion"])) == N_TEST
    assert body["ihvp_report"]["method"] == "ekfac"
    assert get_ok(client, "/api/v1/summary", ihvp="fisher")["ihvp_report"]["method"] == "fisher"


def fisher_reference(run: engine.Run, resnet_path: Path, test_id: int) -> np.ndarray:
    """``−g̃_testᵀ ((1/n) G̃ᵀG̃ + λI)⁻¹ g̃_i`` for every training point, dense in float64."""
    g = np.load(resnet_path / "grads.npy").astype(np.float64)  # (n, K)
    g_test = run.queries.test_gradients([test_id]).double().cpu().numpy()[0]  # (K,)
    shift = run.config.weight_decay + run.config.damping
    h = g.T @ g / g.shape[0] + shift * np.eye(g.shape[1])  # (K, K)
    return -g @ np.linalg.solve(h, g_test)  # (n,)


def test_fisher_scores_match_a_dense_float64_solve(client: TestClient, run: engine.Run,
                                                   resnet_path: Path) -> None:
    body = get_ok(client, "/api/v1/test-points/3/scores", ihvp="fisher")
    want = fisher_reference(run, resnet_path, 3)
    np.testing.assert_allclose(body["scores"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("method", METHODS)
def test_test_point_influence_per_method(client: TestClient, method: str) -> None:
    body = get_ok(client, "/api/v1/test-points/0/influence", ihvp=method, top=TOP)
    scores = np.asarray(get_ok(client, "/api/v1/test-points/0/scores", ihvp=method)["scores"])
    order = np.argsort(scores, kind="stable")
    helpful, harmful = body["helpful"], body["harmful"]
    assert [h["train_id"] for h in helpful] == order[:TOP].tolist()
    assert [h["train_id"] for h in harmful] == order[::-1][:TOP].tolist()
    assert all(h["score"] < 0 for h in helpful) and all(h["score"] > 0 for h in harmful)
    assert len(body["probabilities"]) == N_CLASSES


def test_the_two_methods_rank_differently(client: TestClient) -> None:
    fisher, ekfac = (np.asarray(get_ok(client, "/api/v1/test-points/0/scores", ihvp=m)["scores"])
                     for m in METHODS)
    assert not np.allclose(fisher, ekfac, rtol=1e-2)


@pytest.mark.parametrize("method", FULL_ONLY)
def test_methods_that_need_full_gradients_are_refused(client: TestClient, method: str) -> None:
    r = client.get("/api/v1/test-points/0/influence", params={"ihvp": method})
    assert r.status_code in (400, 422)
    detail = r.json()["detail"]
    assert f"'{method}'" in detail and "kronecker" in detail and "fisher" in detail and "ekfac" in detail


def test_train_point(client: TestClient, run: engine.Run) -> None:
    body = get_ok(client, "/api/v1/train-points/0")
    assert body["train_id"] == 0 and body["n_train"] == N_TRAIN and body["ihvp"] == "ekfac"
    assert body["self_influence"] == pytest.approx(run.self_influence("ekfac")[0], rel=1e-9)
    assert 1 <= body["rank"] <= N_TRAIN


@pytest.mark.parametrize("method", METHODS)
def test_train_point_influence_is_a_column_of_the_scores(client: TestClient, method: str) -> None:
    """The test points train point 0 helps/harms most: row 0 of every test point's scores."""
    body = get_ok(client, "/api/v1/train-points/0/influence", ihvp=method, top=TOP)
    column = np.array([get_ok(client, f"/api/v1/test-points/{j}/scores", ihvp=method)["scores"][0]
                       for j in range(N_TEST)])  # (n_test,)
    got = {h["test_id"]: h["score"] for h in body["helpful"] + body["harmful"]}
    np.testing.assert_allclose(list(got.values()), column[list(got)], rtol=1e-3, atol=1e-6)
    assert [h["test_id"] for h in body["helpful"]] == np.argsort(column, kind="stable")[:TOP].tolist()


def test_train_point_params_needs_full_gradients(client: TestClient) -> None:
    r = client.get("/api/v1/train-points/0/params")
    assert r.status_code in (400, 422) and "full gradients" in r.json()["detail"]


@pytest.mark.parametrize("method", METHODS)
def test_self_influence_ranking(client: TestClient, run: engine.Run, method: str) -> None:
    body = get_ok(client, "/api/v1/self-influence", ihvp=method, top=10)
    assert body["ihvp"] == method and body["total"] == N_TRAIN
    want = run.self_influence(method)
    ranked = np.argsort(-np.abs(want), kind="stable")[:10]
    assert [it["train_id"] for it in body["items"]] == ranked.tolist()
    assert [it["rank"] for it in body["items"]] == list(range(1, 11))


def test_group_influence_first_order_sums_the_scores(client: TestClient, run: engine.Run) -> None:
    group, tests = [0, 5, 9, 17], [0, 1, 2]
    r = client.post("/api/v1/group-influence", json={"train_ids": group, "test_ids": tests, "order": 1,
                                                     "ihvp": "fisher"})
    assert r.status_code == 200, r.text
    body = r.json()
    want = run.scores(tests, ihvp="fisher")[group].sum(axis=0)  # (3,)
    np.testing.assert_allclose([row["influence"] for row in body["results"]], want, rtol=1e-3)


def test_group_influence_second_order_is_refused(client: TestClient) -> None:
    r = client.post("/api/v1/group-influence", json={"train_ids": [0, 1], "test_ids": [0], "order": 2})
    assert r.status_code in (400, 422)
    assert "full gradients" in r.json()["detail"]


@pytest.mark.parametrize("method", METHODS)
def test_query_with_a_png(client: TestClient, method: str) -> None:
    r = client.post("/api/v1/query", params={"top": TOP, "ihvp": method},
                    files={"file": ("bar.png", upload_png(), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["predicted"] == int(np.argmax(body["probabilities"]))
    assert len(body["helpful"]) == len(body["harmful"]) == TOP
    assert all(h["score"] < 0 for h in body["helpful"]) and all(h["score"] > 0 for h in body["harmful"])


def test_train_image(client: TestClient) -> None:
    r = client.get("/api/v1/images/train/0.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size[0] == img.size[1] > 0
