"""Audits against SQLite and a real PostgreSQL server: create, read through the permalink after
a restart, concurrent item writes, tokens, exports, and run-mismatch warnings.

PostgreSQL tests use ``INFLUENCE_TEST_POSTGRES_URL`` (a role that may CREATE DATABASE; `.ci/run`
starts Debian's server and sets it); without it they are skipped, unless
``INFLUENCE_REQUIRE_POSTGRES=1`` makes that a failure.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import engine
from app.audits.db import head_revision, make_engine, migrate, revision
from app.audits.exports import CSV_COLUMNS, RELABEL_COLUMNS
from app.main import create_app
from app.settings import Settings

from .conftest import N_TEST, N_TRAIN, write_image_npz

API_KEY = "k" * 32


def _client(run_path: Path, db_url: str, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(run=run_path, database_url=db_url, **settings)))


@pytest.fixture(scope="module")
def audit_client(run_path: Path, db_url: str) -> Iterator[TestClient]:
    with _client(run_path, db_url, api_key=API_KEY) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ITEMS = [
    {"kind": "test_point", "test_id": 4, "top": 3, "note": "why is 4 wrong?"},
    {"kind": "mislabel", "train_id": 7, "suggested_label": 2, "note": "looks like a 2"},
    {"kind": "group", "train_ids": [1, 2, 3, 5], "test_ids": [0, 4], "order": 2},
    {"kind": "mislabel", "train_id": 9, "verdict": "fine"},
]


def _create(client: TestClient, items: list[dict] | None = None) -> dict:
    r = client.post("/api/v1/audits", json={"title": "digits check", "description": "first pass",
                                            "items": ITEMS if items is None else items},
                    headers=_bearer(API_KEY))  # the server has a key: creating needs it
    assert r.status_code == 201, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------


def test_schema_is_migrated_to_head(db_url: str, audit_client: TestClient) -> None:
    eng = make_engine(db_url)
    assert revision(eng) == head_revision() == "0001"
    assert migrate(eng) == "0001"  # idempotent
    assert {"audits", "audit_items", "alembic_version"} <= set(sa.inspect(eng).get_table_names())
    eng.dispose()


def test_create_snapshots_what_was_seen(audit_client: TestClient, run: engine.Run) -> None:
    body = _create(audit_client)
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", body["slug"]) and len(body["edit_token"]) >= 24
    assert body["url"] == f"/audits/{body['slug']}"
    got = audit_client.get(f"/api/v1/audits/{body['slug']}").json()
    assert [it["kind"] for it in got["items"]] == [it["kind"] for it in ITEMS]
    assert [it["position"] for it in got["items"]] == [1, 2, 3, 4]
    assert got["run_matches"] is True and got["warning"] is None
    tp = got["items"][0]
    seen = audit_client.get("/api/v1/test-points/4/influence", params={"top": 3}).json()
    assert [r["train_id"] for r in tp["helpful"]] == [r["train_id"] for r in seen["helpful"]]
    assert [r["score"] for r in tp["harmful"]] == pytest.approx([r["score"] for r in seen["harmful"]])
    assert tp["note"] == "why is 4 wrong?" and tp["ihvp"] == "exact" and tp["top"] == 3
    assert set(tp["images"]) == {"test/4"} | {f"train/{r['train_id']}" for r in seen["helpful"] + seen["harmful"]}
    ml = got["items"][1]
    assert (ml["train_id"], ml["label"], ml["suggested_label"]) == (7, int(run.dataset.y_train[7]), 2)
    assert ml["self_influence"] == pytest.approx(run.self_influence()[7])
    group = got["items"][2]
    want = audit_client.post("/api/v1/group-influence",
                             json={"train_ids": [1, 2, 3, 5], "test_ids": [0, 4], "order": 2}).json()
    assert [r["test_id"] for r in group["results"]] == [0, 4]
    assert [r["predicted_loss_change"] for r in group["results"]] == pytest.approx(
        [r["predicted_loss_change"] for r in want["results"]])
    assert "edit_token" not in got and "edit_token_hash" not in json.dumps(got)


def test_permalink_survives_a_restart(run_path: Path, db_url: str) -> None:
    with _client(run_path, db_url) as first:
        body = _create(first)
        before = first.get(f"/api/v1/audits/{body['slug']}").json()
    with _client(run_path, db_url) as second:  # a new app process on the same database
        after = second.get(f"/api/v1/audits/{body['slug']}").json()
        page = second.get(body["url"])
        r = second.post(f"/api/v1/audits/{body['slug']}/items", headers=_bearer(body["edit_token"]),
                        json={"kind": "mislabel", "train_id": 3})
    assert after == before
    assert page.status_code == 200 and "digits check" in page.text
    assert page.text.count('class="card audit-item') == len(ITEMS)
    assert r.status_code == 201  # the token still edits after the restart


def test_concurrent_item_writes_lose_nothing(run_path: Path, db_url: str) -> None:
    """Eight threads add 12 items each to one audit through a real server: all 96 are there."""
    import urllib.request

    import uvicorn

    app = create_app(Settings(run=run_path, database_url=db_url))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    def call(method: str, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method=method,
                                     headers={"content-type": "application/json",
                                              **(_bearer(token) if token else {})})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())

    try:
        _, created = call("POST", "/api/v1/audits", {"title": "concurrent", "items": []})
        slug, token = created["slug"], created["edit_token"]
        errors: list[str] = []

        def writer(w: int) -> None:
            for j in range(12):
                try:
                    status, _ = call("POST", f"/api/v1/audits/{slug}/items",
                                     {"kind": "mislabel", "train_id": (w * 12 + j) % N_TRAIN,
                                      "note": f"w{w}-{j}"}, token)
                    assert status == 201
                except Exception as exc:  # noqa: BLE001 - collected: a thread's failure would be lost
                    errors.append(f"{w}-{j}: {exc}")

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with urllib.request.urlopen(f"{base}/api/v1/audits/{slug}", timeout=60) as resp:
            items = json.loads(resp.read())["items"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert errors == []
    notes = sorted(it["note"] for it in items)
    assert notes == sorted(f"w{w}-{j}" for w in range(8) for j in range(12))
    assert [it["position"] for it in items] == list(range(1, 97))
    for w in range(8):  # each writer's items keep their own order
        mine = [int(it["note"].split("-")[1]) for it in items if it["note"].startswith(f"w{w}-")]
        assert mine == list(range(12))


def test_writes_need_the_edit_token(audit_client: TestClient) -> None:
    body = _create(audit_client, ITEMS[1:2])
    slug, token = body["slug"], body["edit_token"]
    item = {"kind": "mislabel", "train_id": 11}
    attempts = [
        ("post", f"/api/v1/audits/{slug}/items", {"json": item}),
        ("patch", f"/api/v1/audits/{slug}", {"json": {"title": "mine now"}}),
        ("delete", f"/api/v1/audits/{slug}/items/{1}", {}),
    ]
    other = _create(audit_client, [])["edit_token"]  # a real token, of another audit
    for headers in ({}, _bearer("wrong"), _bearer(other), {"Authorization": token},
                    {"Authorization": f"Basic {token}"}):
        for method, url, kw in attempts:
            r = getattr(audit_client, method)(url, headers=headers, **kw)
            assert r.status_code == 403, (method, url, headers, r.text)
            assert r.json()["detail"]
    unchanged = audit_client.get(f"/api/v1/audits/{slug}").json()
    assert unchanged["title"] == "digits check" and len(unchanged["items"]) == 1
    assert audit_client.post(f"/api/v1/audits/{slug}/items", json=item, headers=_bearer(token)).status_code == 201
    assert audit_client.patch(f"/api/v1/audits/{slug}", json={"title": "renamed"},
                              headers=_bearer(API_KEY)).json()["title"] == "renamed"  # the API key edits too
    first_id = audit_client.get(f"/api/v1/audits/{slug}").json()["items"][0]["id"]
    assert audit_client.delete(f"/api/v1/audits/{slug}/items/{first_id}", headers=_bearer(token)).status_code == 204
    assert len(audit_client.get(f"/api/v1/audits/{slug}").json()["items"]) == 1


def test_listing_needs_the_api_key(audit_client: TestClient) -> None:
    assert audit_client.get("/api/v1/audits").status_code == 403
    assert audit_client.get("/api/v1/audits", headers=_bearer("x" * 32)).status_code == 403
    slug = _create(audit_client, [])["slug"]
    listed = audit_client.get("/api/v1/audits", headers=_bearer(API_KEY)).json()
    assert slug in {a["slug"] for a in listed["items"]} and listed["total"] >= 1


def test_exports(audit_client: TestClient) -> None:
    body = _create(audit_client)
    slug = body["slug"]
    audit = audit_client.get(f"/api/v1/audits/{slug}").json()
    exported = audit_client.get(f"/audits/{slug}.json")
    assert exported.status_code == 200 and json.loads(exported.text) == audit  # round-trips

    rows = list(csv.DictReader(io.StringIO(audit_client.get(f"/audits/{slug}.csv").text)))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == len(ITEMS)
    assert [r["kind"] for r in rows] == [it["kind"] for it in ITEMS]
    tp = audit["items"][0]
    assert rows[0]["test_id"] == "4" and rows[0]["note"] == "why is 4 wrong?"
    assert [int(x) for x in rows[0]["helpful_train_ids"].split(";")] == [r["train_id"] for r in tp["helpful"]]
    assert [float(x) for x in rows[0]["harmful_scores"].split(";")] == [r["score"] for r in tp["harmful"]]
    assert (rows[1]["train_id"], rows[1]["suggested_label"], rows[1]["verdict"]) == ("7", "2", "mislabelled")
    assert rows[2]["group_train_ids"] == "1;2;3;5" and rows[2]["group_order"] == "2"

    relabel = list(csv.DictReader(io.StringIO(audit_client.get(f"/audits/{slug}/relabel.csv").text)))
    assert relabel and list(relabel[0]) == RELABEL_COLUMNS
    assert [(r["train_id"], r["new_label"]) for r in relabel] == [("7", "2")]  # "fine" marks are not relabels

    html = audit_client.get(f"/audits/{slug}.html")
    assert html.status_code == 200 and "attachment" in html.headers["content-disposition"]
    text = html.text
    markup = re.sub(r"<script>.*?</script>", "", text, flags=re.DOTALL)  # the inlined code itself aside
    assert not re.search(r'(src|href)="(https?:)?/', markup)  # nothing to fetch: opens from a file
    assert markup.count("data:image/png;base64,") == sum(len(it["images"]) for it in audit["items"])
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inlined


def test_run_mismatch_is_warned(run_path: Path, db_url: str, tmp_path: Path) -> None:
    with _client(run_path, db_url) as c:
        slug = _create(c, ITEMS[:1])["slug"]
    other = tmp_path / "other"
    engine.build(str(write_image_npz(tmp_path / "o.npz", seed=9)), "logreg", other, device="cpu",
                 progress=False)
    with _client(other, db_url) as c:
        got = c.get(f"/api/v1/audits/{slug}").json()
        page = c.get(f"/audits/{slug}").text
    assert got["run_matches"] is False and "different run" in got["warning"]
    assert "different run" in page
    assert got["items"][0]["test_id"] == 4  # what was seen then is still shown


@pytest.mark.parametrize("payload, status", [
    ({"title": "", "items": []}, 422),
    ({"items": []}, 422),
    ({"title": "x", "items": [{"kind": "opinion"}]}, 422),
    ({"title": "x", "items": [{"kind": "test_point", "test_id": N_TEST}]}, 404),
    ({"title": "x", "items": [{"kind": "test_point", "test_id": 1, "top": 0}]}, 422),
    ({"title": "x", "items": [{"kind": "mislabel", "train_id": 1, "suggested_label": 9}]}, 422),
    ({"title": "x", "items": [{"kind": "mislabel", "train_id": N_TRAIN}]}, 404),
    ({"title": "x", "items": [{"kind": "mislabel", "train_id": 1, "colour": "red"}]}, 422),
    ({"title": "x", "items": [{"kind": "group", "train_ids": [], "test_ids": [0]}]}, 422),
    ({"title": "x" * 201, "items": []}, 422),
])
def test_bad_audits_are_refused_and_nothing_is_saved(audit_client: TestClient, payload: dict,
                                                     status: int) -> None:
    before = audit_client.get("/api/v1/audits", headers=_bearer(API_KEY)).json()["total"]
    r = audit_client.post("/api/v1/audits", json=payload, headers=_bearer(API_KEY))
    assert r.status_code == status, r.text
    assert r.json()["detail"]
    assert audit_client.get("/api/v1/audits", headers=_bearer(API_KEY)).json()["total"] == before


def test_unknown_slugs_are_404(audit_client: TestClient) -> None:
    for url in ("/api/v1/audits/nope", "/audits/nope", "/audits/nope.html", "/audits/nope.csv",
                "/audits/nope.json", "/audits/nope/relabel.csv"):
        r = audit_client.get(url)
        assert r.status_code == 404, url
    r = audit_client.post("/api/v1/audits/nope/items", json={"kind": "mislabel", "train_id": 1},
                          headers=_bearer("t"))
    assert r.status_code == 404


def test_bad_database_url_fails_at_start(run_path: Path, tmp_path: Path) -> None:
    from app.audits.db import DatabaseError

    with pytest.raises(DatabaseError, match="does not exist"), \
            _client(run_path, f"sqlite:///{tmp_path}/missing/dir/a.sqlite3"):
        pass
    with pytest.raises(DatabaseError, match="bad database URL"), _client(run_path, "not a url"):
        pass

