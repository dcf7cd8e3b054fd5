"""Bad input everywhere: each gets a 4xx JSON answer whose ``detail`` says what was wrong.

Uploads (truncated, bombs, odd channel layouts, bodies over the limit however they are sent), ids
and page parameters out of range, unknown IHVP methods, malformed JSON and wrong content types,
path tricks on the image and audit routes, and text the audit databases cannot store. What
``test_api*.py`` and ``test_images.py`` already cover is not repeated here.
"""

from __future__ import annotations

import asyncio
import io
import json
import resource
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.images import UploadError, decode_upload
from app.limits import MAX_JSON_BODY, MULTIPART_OVERHEAD
from app.main import create_app
from app.settings import Settings

from .conftest import N_TRAIN

UPLOAD_LIMIT = 64 * 1024  # the package client's
API_KEY = "b" * 32
HUGE = 2**70


def _detail(r: httpx2.Response) -> str:
    """The answer's ``detail`` as one string (FastAPI's validation errors are a list)."""
    detail = r.json()["detail"]
    if isinstance(detail, str):
        return detail
    return " ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in detail)


def _refused(r: httpx2.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    assert words in _detail(r), r.text


def _encode(img: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _upload(client: TestClient, data: bytes, *, name: str = "x.png", mime: str = "image/png") -> httpx2.Response:
    return client.post("/api/v1/query", params={"top": 3}, files={"file": (name, data, mime)})


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header for a width×height 8-bit grayscale image, with pixel data for only a
    few rows: a few hundred bytes that would decode to width×height bytes (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# uploads that are not usable images


def test_truncated_jpeg_is_400(client: TestClient) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    _refused(_upload(client, data[: len(data) // 2], name="x.jpg", mime="image/jpeg"), 400, "truncated")


@pytest.mark.parametrize("width, height, words", [
    (50_000, 50_000, "too large to decode safely"),  # beyond Pillow's own bomb limit
    (10_000, 10_000, "too large to decode safely"),  # past Pillow's warning, which is an error here
    (6_000, 5_000, "pixels"),  # within Pillow's limits, over the app's MAX_UPLOAD_PIXELS
])
def test_decompression_bombs_are_refused_before_decoding(client: TestClient, width: int, height: int,
                                                         words: str) -> None:
    data = _png_declaring(width, height)
    assert len(data) < UPLOAD_LIMIT
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(_upload(client, data), 413, words)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib) / 1024
    assert grown_mib < 100, f"the process grew by {grown_mib:.0f} MiB: the image was decoded"


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 0)  # every pixel is entry 0: black, fully transparent
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    return _encode(img, transparency=0)


@pytest.mark.parametrize("case, data, gray", [
    ("CMYK JPEG, 50% black", lambda: _encode(Image.new("CMYK", (8, 8), (0, 0, 0, 128)), "JPEG"), 127 / 255),
    ("16-bit grayscale PNG, mid grey", lambda: _encode(Image.fromarray(np.full((8, 8), 32896, np.uint16))),
     128 / 255),
    ("LA PNG, opaque", lambda: _encode(Image.new("LA", (8, 8), (200, 255))), 200 / 255),
    ("LA PNG, transparent: white paper", lambda: _encode(Image.new("LA", (8, 8), (0, 0))), 1.0),
    ("RGBA PNG, half transparent black", lambda: _encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128))),
     127 / 255),
    ("palette PNG with a transparent entry", _palette_with_transparency, 1.0),
    ("1-bit PNG", lambda: _encode(Image.new("1", (8, 8), 1)), 1.0),
])
def test_channel_layouts_are_converted(client: TestClient, case: str, data: Any, gray: float) -> None:
    """Every PNG/JPEG layout becomes the run's grayscale input with the grey it shows on white
    paper (16-bit scaled, not clipped to white; transparent pixels are the paper)."""
    payload = data()
    x = decode_upload(payload, input_shape=(8, 8), value_range=(0.0, 1.0), max_bytes=UPLOAD_LIMIT)
    np.testing.assert_allclose(x, gray, atol=1.5 / 255, err_msg=case)
    r = _upload(client, payload)
    assert r.status_code == 200, (case, r.text)


def test_a_run_whose_inputs_are_not_images_of_1_to_4_channels_refuses_uploads() -> None:
    data = _encode(Image.new("RGB", (8, 8)))
    for shape in [(8, 8, 5), (8, 8, 3, 2)]:
        with pytest.raises(UploadError) as err:
            decode_upload(data, input_shape=shape, value_range=(0.0, 1.0), max_bytes=UPLOAD_LIMIT)
        assert err.value.status == 422 and "1 to 4 channels" in err.value.detail


# ---------------------------------------------------------------------------------------------
# bodies over the limit: refused while they stream in, never read whole


def test_upload_over_the_limit_with_an_honest_content_length_is_413(client: TestClient) -> None:
    data = b"\x89PNG\r\n\x1a\n" + b"\0" * (UPLOAD_LIMIT + MULTIPART_OVERHEAD)
    _refused(_upload(client, data), 413, f"uploads are limited to {UPLOAD_LIMIT:,} bytes")


def _call(app: Any, method: str, path: str, headers: dict[str, str], first: bytes, chunk: bytes,
          chunks: int) -> tuple[int, dict[str, Any], int]:
    """Send a body of ``first`` then up to ``chunks`` × ``chunk`` straight to the ASGI app,
    one message at a time; returns the status, the JSON answer and the bytes the app pulled."""
    pulled, sent = 0, 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled, sent
        if sent > chunks:
            return {"type": "http.disconnect"}
        body = first if sent == 0 else chunk
        sent += 1
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": sent <= chunks}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


MULTIPART_HEAD = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
                  b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n")
CHUNK = b"\0" * 16384
ENDLESS = 100_000  # chunks: 1.6 GB if the app read them all


@pytest.mark.parametrize("declared", [None, "4096"], ids=["chunked", "lying-content-length"])
def test_streamed_upload_is_cut_off_at_the_limit(client: TestClient, declared: str | None) -> None:
    """A body without Content-Length (chunked), or one that sends more than it declared, is
    refused once the bytes received pass the limit: the app reads no more than one chunk past it."""
    headers = {"content-type": "multipart/form-data; boundary=B"}
    if declared:
        headers["content-length"] = declared
    status, body, pulled = _call(client.app, "POST", "/api/v1/query", headers, MULTIPART_HEAD, CHUNK, ENDLESS)
    assert status == 413 and f"uploads are limited to {UPLOAD_LIMIT:,} bytes" in body["detail"]
    assert pulled <= UPLOAD_LIMIT + MULTIPART_OVERHEAD + len(CHUNK)


@pytest.mark.parametrize("path, limit", [("/api/v1/query", UPLOAD_LIMIT + MULTIPART_OVERHEAD),
                                         ("/api/v1/group-influence", MAX_JSON_BODY)])
def test_declared_oversized_body_is_refused_unread(client: TestClient, path: str, limit: int) -> None:
    headers = {"content-type": "application/json", "content-length": str(limit + 1)}
    status, body, pulled = _call(client.app, "POST", path, headers, b"{", CHUNK, ENDLESS)
    assert status == 413 and f"{limit + 1:,} bytes" in body["detail"] and "limited to" in body["detail"]
    assert pulled == 0


# ---------------------------------------------------------------------------------------------
# ids, pages and k out of range; unknown IHVP methods


@pytest.mark.parametrize("url, status, words", [
    (f"/api/v1/test-points/{HUGE}", 404, "out of range"),
    (f"/api/v1/train-points/{HUGE}/influence", 404, "out of range"),
    (f"/api/v1/train-points/{-HUGE}/params", 404, "out of range"),
    (f"/api/v1/images/test/{HUGE}.png", 404, "out of range"),
    (f"/api/v1/test-points?offset={2**64}", 422, "offset: Input should be less than or equal to"),
    ("/api/v1/test-points?limit=-1", 422, "limit: Input should be greater than or equal to 1"),
    (f"/api/v1/self-influence?top={HUGE}", 422, "top: Input should be less than or equal to 1000"),
    (f"/api/v1/test-points/0/influence?top={HUGE}", 422, "top: Input should be less than or equal to 500"),
    ("/api/v1/test-points/0/influence?fastif=0", 422, "fastif: Input should be greater than or equal to 1"),
    ("/api/v1/test-points/0/influence?fastif=20&pool=-1", 422, "pool: Input should be greater than"),
    ("/api/v1/test-points/0/influence?fastif=1", 422, "must be at least top"),
    ("/api/v1/groups?by=cluster&clusters=100&cluster=0", 422, f"the {N_TRAIN} training points"),
    ("/api/v1/groups?by=cluster&clusters=1&cluster=0", 422, "clusters: Input should be greater than"),
    ("/api/v1/groups?by=mislabels&top=-2", 422, "top: Input should be greater than or equal to 1"),
    ("/api/v1/groups?by=everything", 422, "by: Input should be 'class', 'mislabels' or 'cluster'"),
    ("/api/v1/groups?by=class&label=0&fraction=nan", 422, "fraction: Input should be"),
    ("/api/v1/jobs/" + "j" * 5000, 404, "no job"),
    ("/api/v1/train-points/0/params?ihvp=bogus", 422, "unknown ihvp method 'bogus'"),
    ("/api/v1/train-points/0/influence?ihvp=newton", 422, "unknown ihvp method 'newton'"),
])
def test_out_of_range_parameters(client: TestClient, url: str, status: int, words: str) -> None:
    _refused(client.get(url), status, words)


# ---------------------------------------------------------------------------------------------
# malformed JSON bodies and wrong content types

JSON_ROUTES = ["/api/v1/group-influence", "/api/v1/group-influence/check", "/api/v1/attacks",
               "/api/v1/audits"]


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("body, content_type, status, words", [
    (b"{not json", "application/json", 422, "JSON decode error"),
    (b'\x82\xff{"a": 1}', "application/json", 400, "could not be parsed: 'utf-8' codec can't decode"),
    (b"[" * 100_000, "application/json", 400, "could not be parsed: maximum recursion depth"),
    (b'{"train_ids": [1], "test_ids": [0]}', "text/plain", 422, "Input should be a valid dictionary"),
    (b"train_ids=1&test_ids=0", "application/x-www-form-urlencoded", 422,
     "Input should be a valid dictionary"),
    (b"[1, 2]", "application/json", 422, "Input should be a valid dictionary"),
])
def test_malformed_bodies(client: TestClient, route: str, body: bytes, content_type: str, status: int,
                          words: str) -> None:
    _refused(client.post(route, content=body, headers={"content-type": content_type}), status, words)


@pytest.mark.parametrize("body, where", [
    (b'{"train_ids": [1e400], "test_ids": [0]}', "body.train_ids.0"),
    (b'{"train_ids": [1], "test_ids": [NaN]}', "body.test_ids.0"),
    (b'{"train_ids": [1], "test_ids": [-Infinity]}', "body.test_ids.0"),
])
def test_non_finite_numbers_in_a_json_body_are_422(client: TestClient, body: bytes, where: str) -> None:
    """Regression: echoing inf/NaN back in the 422 failed to encode (500)."""
    r = client.post("/api/v1/group-influence", content=body, headers={"content-type": "application/json"})
    _refused(r, 422, f"{where}: Input should be a finite number")


@pytest.mark.parametrize("kwargs, status, words", [
    ({"json": {"file": "x"}}, 422, "body.file: Field required"),
    ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "boundary"),
    ({"data": {"file": "not a file"}}, 422, "Expected UploadFile"),
])
def test_upload_route_with_the_wrong_content(client: TestClient, kwargs: dict[str, Any], status: int,
                                             words: str) -> None:
    _refused(client.post("/api/v1/query", **kwargs), status, words)


# ---------------------------------------------------------------------------------------------
# path tricks: never a file outside the run


@pytest.mark.parametrize("url, status, words", [
    ("/api/v1/images/..%2f..%2fetc/passwd", 404, "Not Found"),
    ("/api/v1/images/train/..%2f..%2fetc%2fpasswd.png", 404, "Not Found"),
    ("/api/v1/images/%2e%2e/0.png", 404, "unknown split '..'"),
    ("/api/v1/images/..%5c..%5cetc/0.png", 404, "unknown split"),
    ("/api/v1/images/train/0.png%00.txt", 404, "Not Found"),
    ("/api/v1/images/train/" + "9" * 5000 + ".png", 422, "image_id: Unable to parse input string as an integer"),
    ("/api/v1/images/train/abc.png", 422, "image_id: Input should be a valid integer"),
    ("/api/v1/images/train/%C3%A9.png", 422, "image_id: Input should be a valid integer"),
    ("/api/v1/images/train/%EF%BC%91.png", 422, "image_id: Input should be a valid integer"),  # fullwidth 1
    ("/static/..%2f..%2fetc/passwd", 404, "Not Found"),
    ("/static/%2e%2e/%2e%2e/etc/passwd", 404, "Not Found"),
])
def test_image_path_tricks(client: TestClient, url: str, status: int, words: str) -> None:
    r = client.get(url)
    _refused(r, status, words)
    assert "root:" not in r.text


# ---------------------------------------------------------------------------------------------
# audits: text and ids the databases cannot take (SQLite and PostgreSQL)


@pytest.fixture(scope="module")
def audits(run_path: Path, db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(run=run_path, database_url=db_url, api_key=API_KEY))) as c:
        c.headers["Authorization"] = f"Bearer {API_KEY}"
        yield c


@pytest.fixture(scope="module")
def slug(audits: TestClient) -> str:
    r = audits.post("/api/v1/audits", json={"title": "bad input", "items": [{"kind": "mislabel", "train_id": 1}]})
    assert r.status_code == 201, r.text
    return str(r.json()["slug"])


def _json(body: str) -> dict[str, Any]:
    return {"content": body.encode(), "headers": {"content-type": "application/json"}}


@pytest.mark.parametrize("method, path, body, words", [
    ("POST", "/api/v1/audits", '{"title": "a\\u0000b"}', "body.title: Value error, text cannot contain NUL"),
    ("POST", "/api/v1/audits", '{"title": "t", "description": "\\ud800"}',
     "body.description: Input should be a valid string, unable to parse raw data as a unicode string"),
    ("PATCH", "/api/v1/audits/{slug}", '{"title": "\\u0000"}', "text cannot contain NUL"),
    ("PATCH", "/api/v1/audits/{slug}", '{"description": "x\\udfff"}', "not a lone surrogate"),
    ("POST", "/api/v1/audits/{slug}/items", '{"kind": "mislabel", "train_id": 1, "note": "\\u0000"}',
     "text cannot contain NUL"),
    ("POST", "/api/v1/audits/{slug}/items", '{"kind": "mislabel", "train_id": 1, "note": "\\udc00"}',
     "not a lone surrogate"),
])
def test_audit_text_the_database_cannot_store_is_422(audits: TestClient, slug: str, method: str, path: str,
                                                     body: str, words: str) -> None:
    """Regression: a NUL reached PostgreSQL, and a lone surrogate echoed back in the 422 failed to
    encode as UTF-8: both got 500."""
    _refused(audits.request(method, path.format(slug=slug), **_json(body)), 422, words)


@pytest.mark.parametrize("path, status, words", [
    (f"/api/v1/audits/{{slug}}/items/{HUGE}", 422, "item_id: Input should be less than or equal to 2147483647"),
    (f"/api/v1/audits/{{slug}}/items/{2**31}", 422, "item_id: Input should be less than or equal to"),
    ("/api/v1/audits/{slug}/items/0", 422, "item_id: Input should be greater than or equal to 1"),
    (f"/api/v1/audits/{{slug}}/items/{2**31 - 1}", 404, "has no item 2147483647"),
    ("/api/v1/audits/%00/items/1", 422, "slug: String should match pattern"),
])
def test_audit_item_ids_out_of_range(audits: TestClient, slug: str, path: str, status: int, words: str) -> None:
    """Regression: an item id past 64 bits (SQLite) or 32 bits (PostgreSQL) got 500."""
    _refused(audits.delete(path.format(slug=slug)), status, words)


@pytest.mark.parametrize("url, status, words", [
    (f"/api/v1/audits?offset={2**63}", 422, "offset: Input should be less than or equal to"),
    ("/api/v1/audits/%00", 422, "slug: String should match pattern"),
    ("/audits/%00.json", 422, "slug: String should match pattern"),
    ("/api/v1/audits/" + "s" * 65, 422, "slug: String should match pattern"),
    ("/api/v1/audits/%F0%9F%92%A5", 422, "slug: String should match pattern"),
    ("/api/v1/audits/..%2f..%2fetc%2fpasswd", 404, "Not Found"),
    ("/api/v1/audits/" + "s" * 22, 404, "no audit"),
])
def test_audit_lookups_out_of_range(audits: TestClient, url: str, status: int, words: str) -> None:
    """Regression: a NUL in a slug (PostgreSQL) or an offset past 64 bits got 500."""
    _refused(audits.get(url), status, words)


def test_the_audit_is_intact_after_the_bad_writes(audits: TestClient, slug: str) -> None:
    r = audits.get(f"/api/v1/audits/{slug}")
    assert r.status_code == 200 and r.json()["title"] == "bad input" and len(r.json()["items"]) == 1
