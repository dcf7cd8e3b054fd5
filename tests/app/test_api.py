"""REST routes about the run and its test points (app/routes/meta.py, test_points.py, images.py),
through the test client against the package's small served run (tests/app/conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.cli import main as cli_main
from app.images import MIN_IMAGE_SIDE
from app.routes.images import IMAGE_CACHE
from app.settings import DEFAULT_UPLOAD_LIMIT, Settings

from .conftest import N_CLASSES, N_TEST, N_TRAIN, SIDE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CONTRACT_ROUTES = [  # (method, OpenAPI path) of every /api/v1 route of CONTRACT.md but audits
    ("get", "/api/v1/health"), ("get", "/api/v1/test-points"), ("get", "/api/v1/test-points/{test_id}"),
    ("get", "/api/v1/test-points/{test_id}/influence"), ("post", "/api/v1/query"),
    ("get", "/api/v1/train-points/{train_id}"), ("get", "/api/v1/train-points/{train_id}/influence"),
    ("get", "/api/v1/self-influence"), ("post", "/api/v1/group-influence"),
    ("get", "/api/v1/images/{split}/{image_id}.png"),
]


def _ids(rows: list[dict], key: str = "train_id") -> list[int]:
    return [r[key] for r in rows]


# ---------------------------------------------------------------------------------------------
# settings, health, summary, OpenAPI


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFLUENCE_RUN", str(tmp_path / "r"))
    monkeypatch.setenv("INFLUENCE_PORT", "9001")
    monkeypatch.setenv("INFLUENCE_UPLOAD_LIMIT", "2048")
    s = Settings()  # type: ignore[call-arg]
    assert (s.run, s.host, s.port, s.upload_limit) == (tmp_path / "r", "127.0.0.1", 9001, 2048)
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / 'audits.sqlite3').as_posix()}"
    monkeypatch.setenv("INFLUENCE_DATABASE_URL", "postgresql://u@localhost/audits")
    assert Settings().resolved_database_url == "postgresql://u@localhost/audits"  # type: ignore[call-arg]
    monkeypatch.delenv("INFLUENCE_UPLOAD_LIMIT")
    assert Settings(run=tmp_path).upload_limit == DEFAULT_UPLOAD_LIMIT


def test_health(client: TestClient, run: engine.Run) -> None:
    r = client.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert (body["n_train"], body["n_test"], body["n_classes"]) == (N_TRAIN, N_TEST, N_CLASSES)
    assert (body["model"], body["ihvp"]) == ("logreg", "exact")
    assert body["methods"] == ["exact", "cg", "lissa", "fisher"]  # what a full store allows
    assert body["test_accuracy"] == pytest.approx(run.info.training["test_accuracy"])


def test_summary_confusion_matrix(client: TestClient, run: engine.Run) -> None:
    body = client.get("/api/v1/summary").json()
    pred = run.predict_proba(run.dataset.x_test).argmax(axis=1)
    confusion = np.array(body["confusion"])
    assert confusion.shape == (N_CLASSES, N_CLASSES) and confusion.sum() == N_TEST
    for t in range(N_CLASSES):
        for p in range(N_CLASSES):
            assert confusion[t, p] == int(((run.dataset.y_test == t) & (pred == p)).sum())
    assert body["accuracy"] == pytest.approx(np.trace(confusion) / N_TEST)
    assert body["accuracy"] == pytest.approx(body["test_accuracy"])
    assert body["input_shape"] == [SIDE, SIDE] and body["class_names"] == ["0", "1", "2"]
    assert body["ihvp_report"]["method"] == "exact"
    assert body["ihvp_report"]["settings"]["positive_definite"] is True
    assert body["ihvp_report"]["settings"]["min_eigenvalue"] >= run.config.weight_decay * (1 - 1e-9)
    cg = client.get("/api/v1/summary?ihvp=cg").json()["ihvp_report"]
    assert cg["method"] == "cg" and "tol" in cg["settings"]


def test_openapi_lists_every_contract_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for method, path in CONTRACT_ROUTES:
        assert method in paths.get(path, {}), (method, path)
        assert paths[path][method].get("description") or paths[path][method].get("summary")


def test_docs_are_served_without_a_cdn(client: TestClient) -> None:
    html = client.get("/docs").text
    assert "cdn" not in html.lower() and "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/static/vendor/swagger-ui/{asset}").status_code == 200
    js = client.get("/assets/plotly.min.js")
    assert js.status_code == 200 and "plotly" in js.text[:200].lower()
    assert js.headers["content-type"].startswith("text/javascript")


# ---------------------------------------------------------------------------------------------
# the test-point list: filters and pages


def test_list_test_points_pages_through_everything(client: TestClient, run: engine.Run) -> None:
    seen = []
    for offset in range(0, N_TEST, 7):
        body = client.get("/api/v1/test-points", params={"offset": offset, "limit": 7}).json()
        assert body["total"] == N_TEST and body["offset"] == offset
        seen += body["items"]
    assert _ids(seen, "test_id") == list(range(N_TEST))
    proba = run.predict_proba(run.dataset.x_test)
    for item in seen:
        i = item["test_id"]
        assert item["label"] == int(run.dataset.y_test[i])
        assert item["predicted"] == int(proba[i].argmax())
        assert item["confidence"] == pytest.approx(proba[i].max())
    beyond = client.get("/api/v1/test-points", params={"offset": N_TEST + 5}).json()
    assert beyond["total"] == N_TEST and beyond["items"] == []


@pytest.mark.parametrize("params", [
    {"label": 1}, {"predicted": 2}, {"misclassified": "true"}, {"misclassified": "false"},
    {"min_confidence": 0.8}, {"max_confidence": 0.6}, {"label": 0, "predicted": 0, "min_confidence": 0.5},
])
def test_list_test_points_filters(client: TestClient, run: engine.Run, params: dict) -> None:
    body = client.get("/api/v1/test-points", params={**params, "limit": 1000}).json()
    proba = run.predict_proba(run.dataset.x_test)
    pred, conf, y = proba.argmax(1), proba.max(1), run.dataset.y_test
    keep = np.ones(N_TEST, dtype=bool)
    if "label" in params:
        keep &= y == params["label"]
    if "predicted" in params:
        keep &= pred == params["predicted"]
    if "misclassified" in params:
        keep &= (pred != y) == (params["misclassified"] == "true")
    if "min_confidence" in params:
        keep &= conf >= params["min_confidence"]
    if "max_confidence" in params:
        keep &= conf <= params["max_confidence"]
    assert body["total"] == int(keep.sum())
    assert _ids(body["items"], "test_id") == np.flatnonzero(keep).tolist()


@pytest.mark.parametrize("query", ["limit=0", "limit=100000", "offset=-1", "label=7", "predicted=-1",
                                   "misclassified=maybe", "min_confidence=1.5", "label=x"])
def test_list_test_points_bad_params_are_422(client: TestClient, query: str) -> None:
    r = client.get(f"/api/v1/test-points?{query}")
    assert r.status_code == 422, query
    assert r.json()["detail"]


# ---------------------------------------------------------------------------------------------
# one test point: prediction, influence, all scores


def test_test_point(client: TestClient, run: engine.Run) -> None:
    body = client.get("/api/v1/test-points/4").json()
    proba = run.predict_proba(run.dataset.x_test[4:5])[0]
    assert (body["test_id"], body["label"]) == (4, int(run.dataset.y_test[4]))
    assert body["predicted"] == int(proba.argmax())
    assert body["probabilities"] == pytest.approx(proba.tolist())


@pytest.mark.parametrize("bad", [N_TEST, N_TEST + 7, -1])
def test_test_point_out_of_range_is_404(client: TestClient, bad: int) -> None:
    for url in (f"/api/v1/test-points/{bad}", f"/api/v1/test-points/{bad}/influence",
                f"/api/v1/test-points/{bad}/scores"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "out of range" in r.json()["detail"]


def test_influence_is_the_top_of_the_score_column(client: TestClient, run: engine.Run) -> None:
    i, k = 3, 7
    body = client.get(f"/api/v1/test-points/{i}/influence", params={"top": k}).json()
    assert body["test_id"] == i and body["ihvp"]["method"] == "exact"
    col = run.scores([i])[:, 0]  # (n_train,) I_up,loss
    order = np.argsort(col, kind="stable")
    assert _ids(body["helpful"]) == order[:k].tolist()  # most negative first
    assert _ids(body["harmful"]) == order[::-1][:k].tolist()  # most positive first
    for row in body["helpful"] + body["harmful"]:
        assert row["score"] == pytest.approx(col[row["train_id"]], rel=1e-9, abs=1e-12)
        assert row["label"] == int(run.dataset.y_train[row["train_id"]])


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_api_scores_equal_the_cli_scores(client: TestClient, run: engine.Run, run_path: Path,
                                         tmp_path: Path, method: str) -> None:
    """The contract: the API serves the CLI's ``scores`` for the same run and IHVP method."""
    out = tmp_path / "scores.npy"
    assert cli_main(["scores", "--run", str(run_path), "--out", str(out), "--test-index", "2", "5",
                     "--ihvp", method]) == 0
    cli = np.load(out)  # (n_train, 2)
    for j, i in enumerate((2, 5)):
        body = client.get(f"/api/v1/test-points/{i}/scores", params={"ihvp": method}).json()
        assert body["ihvp"] == method
        np.testing.assert_allclose(body["scores"], cli[:, j], rtol=1e-7, atol=1e-10)
        by_class = np.bincount(run.dataset.y_train, weights=cli[:, j], minlength=N_CLASSES)
        np.testing.assert_allclose(body["by_class"], by_class, rtol=1e-7, atol=1e-9)
        top = client.get(f"/api/v1/test-points/{i}/influence",
                         params={"top": 5, "ihvp": method}).json()
        np.testing.assert_allclose([r["score"] for r in top["harmful"]],
                                   np.sort(cli[:, j])[::-1][:5], rtol=1e-7, atol=1e-10)


def test_influence_default_top_and_order(client: TestClient) -> None:
    default = client.get("/api/v1/test-points/0/influence").json()
    assert len(default["helpful"]) == len(default["harmful"]) == 10
    body = client.get("/api/v1/test-points/0/influence?top=5").json()
    helpful, harmful = [r["score"] for r in body["helpful"]], [r["score"] for r in body["harmful"]]
    assert helpful == sorted(helpful) and harmful == sorted(harmful, reverse=True)
    assert helpful[0] <= harmful[-1]


@pytest.mark.parametrize("query", ["top=0", "top=abc", "top=501", "top=-3", "top=1e3"])
def test_influence_bad_top_is_422(client: TestClient, query: str) -> None:
    r = client.get(f"/api/v1/test-points/0/influence?{query}")
    assert r.status_code == 422
    assert r.json()["detail"]


@pytest.mark.parametrize("method", ["newton", "projected", ""])
def test_bad_ihvp_is_422(client: TestClient, method: str) -> None:
    for url in ("/api/v1/test-points/0/influence", "/api/v1/test-points/0/scores", "/api/v1/summary",
                "/api/v1/train-points/0", "/api/v1/self-influence"):
        r = client.get(url, params={"ihvp": method})
        assert r.status_code == 422, (url, method)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]


def test_non_integer_id_is_422(client: TestClient) -> None:
    for url in ("/api/v1/test-points/abc", "/api/v1/test-points/1.5/influence"):
        r = client.get(url)
        assert r.status_code == 422 and r.json()["detail"]


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    r = client.get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.json()["detail"]


# ---------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("split,index", [("train", 0), ("train", N_TRAIN - 1), ("test", 5)])
def test_image_png(client: TestClient, run: engine.Run, split: str, index: int) -> None:
    r = client.get(f"/api/v1/images/{split}/{index}.png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == IMAGE_CACHE
    assert r.content.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(r.content)) as im:
        assert min(im.size) >= MIN_IMAGE_SIDE and im.mode == "L"
        pixels = np.asarray(im)
    x = run.dataset.x_train[index] if split == "train" else run.dataset.x_test[index]
    factor = pixels.shape[0] // SIDE  # scaled up by an integer factor, nearest neighbour
    assert np.array_equal(pixels[::factor, ::factor], np.rint(x * 255).astype(np.uint8))
    assert np.array_equal(pixels, np.repeat(np.repeat(pixels[::factor, ::factor], factor, 0), factor, 1))


@pytest.mark.parametrize("url", ["/api/v1/images/valid/0.png", "/api/v1/images/train/90.png",
                                 "/api/v1/images/test/30.png", "/api/v1/images/test/-1.png",
                                 "/api/v1/images/..%2F..%2Fetc/passwd.png", "/api/v1/images/train/0.jpg"])
def test_image_bad_split_or_id_is_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404, url
    assert r.json()["detail"]


def test_influence_with_fastif(client: TestClient, run: engine.Run) -> None:
    """FastIF candidates: scores equal the full scan's for the rows it returns; with every
    training point as a candidate the lists equal the full scan's."""
    full = client.get("/api/v1/test-points/6/influence", params={"top": 5}).json()
    every = client.get("/api/v1/test-points/6/influence", params={"top": 5, "fastif": N_TRAIN}).json()
    assert [r["train_id"] for r in every["helpful"]] == [r["train_id"] for r in full["helpful"]]
    assert [r["train_id"] for r in every["harmful"]] == [r["train_id"] for r in full["harmful"]]
    few = client.get("/api/v1/test-points/6/influence", params={"top": 5, "fastif": 20, "pool": 5}).json()
    assert few["fastif"] == {"candidates": 20, "pool": 5, "scored": few["fastif"]["scored"], "space": "features"}
    assert 20 <= few["fastif"]["scored"] <= 25
    col = run.scores([6])[:, 0]
    for r in few["helpful"] + few["harmful"]:
        assert r["score"] == pytest.approx(col[r["train_id"]], rel=1e-9, abs=1e-12)
    assert client.get("/api/v1/test-points/6/influence", params={"top": 30, "fastif": 10}).status_code == 422
    assert client.get("/api/v1/test-points/6/influence", params={"fastif": 0}).status_code == 422
