"""Tests for the web layer (app/main.py, app/api.py): the first REST routes and the overview page.

One module-scoped run (CPU, float64 logreg) on a seeded ``.npz`` of 8x8 images in [0, 1]
(90 train / 30 test, 3 classes) is served through ``TestClient`` used as a context manager, so
the app's lifespan opens the run exactly as the real server does.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.api import IMAGE_CACHE, MIN_IMAGE_SIDE, png_bytes
from app.main import create_app
from app.settings import Settings

N_TRAIN, N_TEST, N_CLASSES, SIDE = 90, 30, 3, 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_npz(path: Path, *, seed: int = 0) -> Path:
    """Learnable 8x8 'images' in [0, 1]: class k brightens its own band of rows."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        x = rng.uniform(0.0, 0.4, size=(n, SIDE, SIDE))
        for k in range(N_CLASSES):
            x[y == k, 2 * k : 2 * k + 3, :] += 0.5
        return np.clip(x, 0.0, 1.0), y

    x_train, y_train = split(N_TRAIN)
    x_test, y_test = split(N_TEST)
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def run_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npz = write_npz(tmp_path_factory.mktemp("data") / "images.npz")
    out = tmp_path_factory.mktemp("runs") / "logreg"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="module")
def client(run_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(run=run_path))) as c:
        yield c


@pytest.fixture(scope="module")
def run(client: TestClient) -> engine.Run:
    """The run the app opened in its lifespan."""
    app_run = client.app.state.run  # type: ignore[attr-defined]
    assert isinstance(app_run, engine.Run)
    return app_run


def _pairs(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["train_id"], r["score"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# settings and health


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INFLUENCE_RUN", str(tmp_path))
    monkeypatch.setenv("INFLUENCE_PORT", "9001")
    s = Settings()  # type: ignore[call-arg]
    assert (s.run, s.host, s.port) == (tmp_path, "127.0.0.1", 9001)


def test_health(client: TestClient, run: engine.Run) -> None:
    r = client.get("/api/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert (body["n_train"], body["n_test"]) == (N_TRAIN, N_TEST)
    assert body["model"] == "logreg"
    assert body["ihvp"] == "exact"
    assert body["test_accuracy"] == pytest.approx(run.info["training"]["test_accuracy"])
    assert 0.0 <= body["test_accuracy"] <= 1.0


def test_openapi_lists_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/v1/health", "/api/v1/test-points/{test_id}",
              "/api/v1/test-points/{test_id}/influence", "/api/v1/images/{split}/{image_id}.png"):
        assert p in paths


# ---------------------------------------------------------------------------------------------
# test points


def test_test_point(client: TestClient, run: engine.Run) -> None:
    body = client.get("/api/v1/test-points/4").json()
    proba = run.predict_proba(run.dataset.x_test[4:5])[0]
    assert body["test_id"] == 4
    assert body["label"] == int(run.dataset.y_test[4])
    assert body["predicted"] == int(proba.argmax())
    assert body["probabilities"] == pytest.approx(proba.tolist())
    assert sum(body["probabilities"]) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [N_TEST, N_TEST + 7, -1])
def test_test_point_out_of_range_is_404(client: TestClient, bad: int) -> None:
    for url in (f"/api/v1/test-points/{bad}", f"/api/v1/test-points/{bad}/influence"):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "out of range" in r.json()["detail"]


def test_influence_equals_explain_and_scores(client: TestClient, run: engine.Run) -> None:
    i, k = 3, 7
    r = client.get(f"/api/v1/test-points/{i}/influence", params={"top": k})
    assert r.status_code == 200
    body = r.json()
    expected = run.explain(i, top=k)
    assert body["test_id"] == i
    assert [t for t, _ in _pairs(body["helpful"])] == [t for t, _ in _pairs(expected["helpful"])]
    assert [t for t, _ in _pairs(body["harmful"])] == [t for t, _ in _pairs(expected["harmful"])]
    assert [s for _, s in _pairs(body["helpful"])] == pytest.approx([s for _, s in _pairs(expected["helpful"])])
    assert [s for _, s in _pairs(body["harmful"])] == pytest.approx([s for _, s in _pairs(expected["harmful"])])
    assert body["ihvp"]["method"] == "exact"

    col = run.scores([i])[:, 0]  # (n_train,) I_up,loss, the CLI's `scores`
    order = np.argsort(col, kind="stable")
    assert [r["train_id"] for r in body["helpful"]] == order[:k].tolist()
    assert [r["train_id"] for r in body["harmful"]] == order[::-1][:k].tolist()
    for row in body["helpful"] + body["harmful"]:
        assert row["score"] == pytest.approx(col[row["train_id"]], rel=1e-9, abs=1e-12)
        assert row["label"] == int(run.dataset.y_train[row["train_id"]])


def test_influence_order_and_top(client: TestClient) -> None:
    default = client.get("/api/v1/test-points/0/influence").json()
    assert len(default["helpful"]) == len(default["harmful"]) == 10
    body = client.get("/api/v1/test-points/0/influence?top=5").json()
    helpful = [r["score"] for r in body["helpful"]]
    harmful = [r["score"] for r in body["harmful"]]
    assert len(helpful) == len(harmful) == 5
    assert helpful == sorted(helpful)  # most negative first
    assert harmful == sorted(harmful, reverse=True)  # most positive first
    assert helpful[0] <= harmful[-1]


def test_influence_explicit_ihvp(client: TestClient) -> None:
    exact = client.get("/api/v1/test-points/1/influence?top=4&ihvp=exact").json()
    cg = client.get("/api/v1/test-points/1/influence?top=4&ihvp=cg").json()
    assert cg["ihvp"]["method"] == "cg"
    assert [r["train_id"] for r in cg["helpful"]] == [r["train_id"] for r in exact["helpful"]]


@pytest.mark.parametrize("query", ["top=0", "top=abc", "top=501", "top=-3"])
def test_influence_bad_top_is_422(client: TestClient, query: str) -> None:
    r = client.get(f"/api/v1/test-points/0/influence?{query}")
    assert r.status_code == 422
    assert r.json()["detail"]


@pytest.mark.parametrize("method", ["newton", "projected"])
def test_influence_bad_ihvp_is_4xx(client: TestClient, method: str) -> None:
    r = client.get(f"/api/v1/test-points/0/influence?ihvp={method}")
    assert 400 <= r.status_code < 500
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


def test_non_integer_id_is_422(client: TestClient) -> None:
    r = client.get("/api/v1/test-points/abc")
    assert r.status_code == 422
    assert r.json()["detail"]


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
        assert min(im.size) >= MIN_IMAGE_SIDE
        assert im.mode == "L"
        pixels = np.asarray(im)
    x = run.dataset.x_train[index] if split == "train" else run.dataset.x_test[index]
    factor = pixels.shape[0] // SIDE
    assert np.array_equal(pixels[::factor, ::factor], np.rint(x * 255).astype(np.uint8))


@pytest.mark.parametrize("url", ["/api/v1/images/valid/0.png", "/api/v1/images/train/90.png",
                                 "/api/v1/images/test/30.png", "/api/v1/images/test/-1.png"])
def test_image_bad_split_or_id_is_404(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    assert r.json()["detail"]


def test_png_bytes_shapes() -> None:
    rng = np.random.default_rng(1)
    cases = {(8, 8): "L", (4, 6, 1): "L", (5, 5, 3): "RGB", (3, 3, 4): "RGBA", (16,): "L", (10,): "L"}
    for shape, mode in cases.items():
        data = png_bytes(rng.uniform(size=shape))
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == mode, shape
            assert min(im.size) >= MIN_IMAGE_SIDE, shape
    # values outside [0, 1] are min-max scaled instead of clipped flat
    with Image.open(io.BytesIO(png_bytes(np.array([[-2.0, 2.0]])))) as im:
        assert np.asarray(im).min() == 0 and np.asarray(im).max() == 255


# ---------------------------------------------------------------------------------------------
# the overview page


def test_index_overview(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.template.name == "index.html"  # type: ignore[attr-defined]
    assert r.context["result"] is None  # type: ignore[attr-defined]
    html = r.text
    assert "logreg" in html and "images.npz" in html and "exact" in html
    assert "<img" not in html
    assert "https://" not in html  # no CDN
    assert client.get("/static/style.css").status_code == 200


def test_index_with_test_point(client: TestClient, run: engine.Run) -> None:
    k = 4
    r = client.get("/", params={"test_id": 2, "top": k})
    assert r.status_code == 200
    result = r.context["result"]  # type: ignore[attr-defined]
    assert result["test_id"] == 2 and len(result["helpful"]) == len(result["harmful"]) == k
    html = r.text
    assert len(re.findall(r'<img[^>]+src="/api/v1/images/test/2\.png"', html)) == 1
    train_srcs = re.findall(r'<img[^>]+src="/api/v1/images/train/(\d+)\.png"', html)
    assert len(train_srcs) == 2 * k
    expected = [row["train_id"] for row in result["helpful"] + result["harmful"]]
    assert [int(s) for s in train_srcs] == expected
    for src in set(train_srcs):  # every image the page links to is served
        assert client.get(f"/api/v1/images/train/{src}.png").status_code == 200


@pytest.mark.parametrize("params,status", [({"test_id": N_TEST}, 404), ({"test_id": "x"}, 422),
                                           ({"test_id": 1, "top": 0}, 422), ({"test_id": ""}, 200)])
def test_index_bad_form_input_renders_the_page(client: TestClient, params: dict, status: int) -> None:
    r = client.get("/", params=params)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("text/html")
    assert (r.context["error"] is None) == (status == 200)  # type: ignore[attr-defined]
    assert r.context["result"] is None  # type: ignore[attr-defined]
