"""One small served run for the web tests: a seeded ``.npz`` of 8×8 grayscale images in [0, 1]
(90 train / 30 test, 3 classes), a float64 logreg built on the CPU in about a second, served
through ``TestClient`` used as a context manager so the app's lifespan opens it as the real
server does."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import engine
from app.main import create_app
from app.settings import Settings

PG_ENV = "INFLUENCE_TEST_POSTGRES_URL"
N_TRAIN, N_TEST, N_CLASSES, SIDE = 90, 30, 3, 8


def write_image_npz(path: Path, *, seed: int = 0) -> Path:
    """Learnable 8×8 'images' in [0, 1]: class k brightens its own band of rows."""
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


@pytest.fixture(scope="package")
def run_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    npz = write_image_npz(tmp_path_factory.mktemp("data") / "images.npz")
    out = tmp_path_factory.mktemp("runs") / "logreg"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False)
    return out


@pytest.fixture(scope="package")
def client(run_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(run=run_path, upload_limit=64 * 1024))) as c:
        yield c


@pytest.fixture(scope="package")
def run(client: TestClient) -> engine.Run:
    """The run the app opened in its lifespan."""
    app_run = client.app.state.run  # type: ignore[attr-defined]
    assert isinstance(app_run, engine.Run)
    return app_run


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty audit database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'audits.sqlite3'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        if os.environ.get("INFLUENCE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{PG_ENV} is not set but INFLUENCE_REQUIRE_POSTGRES=1")
        pytest.skip(f"no PostgreSQL server: set {PG_ENV}")
    name = f"influence_t_{secrets.token_hex(4)}"
    admin = sa.create_engine(sa.engine.make_url(base).set(drivername="postgresql+psycopg"),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
