"""What the page tests share: a served run of their own (float64 logreg on the CPU, 90 train /
30 test 8×8 images, 3 classes, through ``TestClient`` as a context manager so the app's lifespan
opens it as the server does), and helpers that fetch a page and check its template."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

import engine
from app.main import create_app
from app.settings import Settings

from .conftest import write_image_npz

__all__ = ["api", "hrefs", "page", "png", "post", "served", "wait_job"]


@contextmanager
def served(folder: Path, **build: Any) -> Iterator[TestClient]:
    """A client of the app serving a run built in ``folder`` (keyword options go to ``build``)."""
    npz, out = write_image_npz(folder / "images.npz"), folder / "run"
    engine.build(str(npz), "logreg", out, device="cpu", progress=False, **build)
    with TestClient(create_app(Settings(run=out))) as c:
        yield c


def page(client: TestClient, url: str, template: str) -> Any:
    """GET an HTML page, check it rendered ``template`` with status 200, and return the response."""
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.template.name == template  # type: ignore[attr-defined]
    return r


def api(client: TestClient, url: str) -> Any:
    r = client.get(url)
    assert r.status_code == 200, r.text
    return r.json()


def post(client: TestClient, url: str, body: dict[str, Any], *, status: int = 200) -> Any:
    r = client.post(url, json=body)
    assert r.status_code == status, r.text
    return r.json()


def hrefs(html: str, prefix: str) -> list[int]:
    """Ids of the links to ``prefix{id}`` in the page, in order (outside the figures' data tables)."""
    html = re.sub(r'<details class="data-table".*?</details>', "", html, flags=re.DOTALL)
    return [int(m) for m in re.findall(rf'href="{re.escape(prefix)}(\d+)', html)]


def wait_job(client: TestClient, url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll a background job until it has finished; its last state."""
    end = time.time() + timeout
    while time.time() < end:
        job = api(client, url)
        if job["status"] in ("done", "error"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {url} did not finish in {timeout} s")


def png(size: int = 32, *, seed: int = 0) -> bytes:
    """A random grey PNG of ``size`` × ``size`` pixels."""
    pixels = (np.random.default_rng(seed).uniform(size=(size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
