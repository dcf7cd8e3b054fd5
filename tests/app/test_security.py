"""Access and browser hardening: the API key guard on write routes, CORS, security headers, and
no secret in the server's logs."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.audits.db import DatabaseError, make_engine
from app.main import create_app
from app.settings import Settings

KEY = "k" * 8 + "-team-api-key-0123"
EXPECTED_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


def _app_client(run_path: Path, tmp_path: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(run=run_path, database_url=f"sqlite:///{tmp_path}/a.db",
                                          **settings)))


@pytest.fixture()
def keyed(run_path: Path, tmp_path: Path) -> Iterator[TestClient]:
    with _app_client(run_path, tmp_path, api_key=KEY) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", ["/api/v1/health", "/", "/test-points/0", "/api/v1/test-points/99999",
                                  "/static/style.css", "/api/v1/images/train/0.png", "/no-such-page",
                                  "/docs", "/openapi.json"])
def test_every_response_carries_the_security_headers(client: TestClient, path: str) -> None:
    r = client.get(path)
    for name, value in EXPECTED_HEADERS.items():
        assert r.headers.get(name) == value, (path, name)
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["object-src"] == "'none'"
    script = directives["script-src"]
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script and "*" not in script
    assert re.fullmatch(r"'self' 'nonce-[A-Za-z0-9_-]{20,}'", script)


def test_nonce_is_fresh_and_on_the_docs_inline_script(client: TestClient) -> None:
    a, b = client.get("/docs"), client.get("/docs")
    nonces = [re.search(r"'nonce-([^']+)'", r.headers["content-security-policy"]).group(1) for r in (a, b)]
    assert nonces[0] != nonces[1]
    for r, nonce in zip((a, b), nonces):
        scripts = re.findall(r"<script([^>]*)>", r.text)
        inline = [attrs for attrs in scripts if "src=" not in attrs]
        assert inline and all(f'nonce="{nonce}"' in attrs for attrs in inline)


def test_pages_have_no_inline_script_the_policy_would_block(client: TestClient) -> None:
    for path in ["/", "/test-points", "/test-points/0", "/train-points/0", "/mislabels", "/query", "/groups"]:
        html = client.get(path).text
        for attrs, body in re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.DOTALL):
            assert "src=" in attrs or "application/json" in attrs or not body.strip(), path
        assert not re.search(r"\son[a-z]+=", html), f"inline event handler on {path}"


def test_audit_routes_are_not_cached_and_images_are(keyed: TestClient) -> None:
    made = keyed.post("/api/v1/audits", json={"title": "t", "items": []}, headers=_bearer(KEY))
    assert made.status_code == 201
    assert made.headers["cache-control"] == "no-store"  # it carries the edit token
    slug = made.json()["slug"]
    for path in [f"/api/v1/audits/{slug}", f"/audits/{slug}", f"/audits/{slug}.json"]:
        assert keyed.get(path).headers["cache-control"] == "no-store", path
    page = keyed.get(f"/audits/{slug}")
    assert "<script>" not in page.text  # figures are a JSON block drawn by /static/report.js
    assert 'id="audit-figures"' in page.text
    image = keyed.get("/api/v1/images/train/0.png")
    assert "max-age" in image.headers["cache-control"]


def test_write_routes_need_the_api_key_when_one_is_set(keyed: TestClient) -> None:
    writes = [
        ("/api/v1/audits", {"title": "t", "items": []}),
        ("/api/v1/attacks", {"test_id": 0, "n_points": 1, "iterations": 1}),
        ("/api/v1/group-influence/check", {"train_ids": [0, 1], "test_ids": [0]}),
    ]
    for path, body in writes:
        for headers in ({}, _bearer("wrong-key-wrong-key"), _bearer(KEY[:-1]), {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = keyed.post(path, json=body, headers=headers)
            assert r.status_code == 403, (path, headers, r.text)
            assert "API key" in r.json()["detail"]
    assert keyed.post("/api/v1/audits", json=writes[0][1], headers=_bearer(KEY)).status_code == 201
    started = keyed.post("/api/v1/attacks", json=writes[1][1], headers=_bearer(KEY))
    assert started.status_code == 202
    # reading stays open, and so do queries that change nothing
    assert keyed.get("/api/v1/test-points/0/influence?top=3").status_code == 200
    assert keyed.post("/api/v1/group-influence", json={"train_ids": [0], "test_ids": [0]}).status_code == 200
    assert keyed.get(started.json()["url"]).status_code == 200


def test_an_edit_token_cannot_create_or_start_jobs(keyed: TestClient) -> None:
    token = keyed.post("/api/v1/audits", json={"title": "t", "items": []},
                       headers=_bearer(KEY)).json()["edit_token"]
    assert keyed.post("/api/v1/audits", json={"title": "u", "items": []},
                      headers=_bearer(token)).status_code == 403
    assert keyed.post("/api/v1/attacks", json={"test_id": 0}, headers=_bearer(token)).status_code == 403


def test_without_a_key_writes_are_open(client: TestClient) -> None:
    assert client.post("/api/v1/audits", json={"title": "t", "items": []}).status_code == 201


def test_no_cors_unless_configured(client: TestClient) -> None:
    origin = {"Origin": "https://evil.example"}
    assert "access-control-allow-origin" not in client.get("/api/v1/health", headers=origin).headers
    pre = client.options("/api/v1/audits", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers


def test_cors_allows_only_the_named_origins(run_path: Path, tmp_path: Path) -> None:
    with _app_client(run_path, tmp_path, cors_origins=["https://team.example"]) as c:
        ok = {"Origin": "https://team.example"}
        r = c.get("/api/v1/health", headers=ok)
        assert r.headers["access-control-allow-origin"] == "https://team.example"
        assert "access-control-allow-credentials" not in r.headers
        pre = c.options("/api/v1/audits", headers={**ok, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        assert pre.headers["x-frame-options"] == "DENY"
        other = c.get("/api/v1/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("bad", ["team.example", "ftp://x.example", "https://x.example/path", "https://"])
def test_bad_cors_origins_are_refused(run_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="CORS origin"):
        Settings(run=run_path, cors_origins=[bad])


def test_cors_origins_from_the_environment(run_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFLUENCE_CORS_ORIGINS", "https://a.example, http://b.example:8080/")
    assert Settings(run=run_path).cors_origins == ["https://a.example", "http://b.example:8080"]


def test_settings_never_show_the_key(run_path: Path) -> None:
    s = Settings(run=run_path, api_key=KEY)
    assert KEY not in repr(s) and KEY not in str(s) and KEY not in s.model_dump_json()


def test_database_errors_do_not_show_the_password() -> None:
    with pytest.raises(DatabaseError) as info:
        make_engine("postgresql://user:s3cret-pass@:bad-port/db")
    assert "s3cret-pass" not in str(info.value)
    with pytest.raises(DatabaseError) as info:
        make_engine("sqlite:////no/such/folder/a.db")
    assert "/no/such/folder" in str(info.value)


def test_no_secret_reaches_the_logs(run_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The key and edit tokens travel only in headers; nothing the app or uvicorn logs holds them."""
    caplog.set_level(logging.DEBUG)
    with _app_client(run_path, tmp_path, api_key=KEY) as c:
        made = c.post("/api/v1/audits", json={"title": "t", "items": [{"kind": "test_point", "test_id": 0}]},
                      headers=_bearer(KEY)).json()
        token = made["edit_token"]
        slug = made["slug"]
        c.post(f"/api/v1/audits/{slug}/items", json={"kind": "mislabel", "train_id": 1}, headers=_bearer(token))
        c.post(f"/api/v1/audits/{slug}/items", json={"kind": "mislabel", "train_id": 1},
               headers=_bearer(token + "x"))
        c.post(f"/api/v1/audits/{slug}/items", json={"kind": "mislabel", "train_id": 10**9}, headers=_bearer(token))
        c.get("/api/v1/audits", headers=_bearer(KEY))
    logged = "\n".join(f"{r.name} {r.getMessage()} {r.args}" for r in caplog.records)
    assert KEY not in logged and token not in logged
