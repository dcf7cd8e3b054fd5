"""Faults of a real server process: a run whose files are missing or corrupt is refused at start
with one clear line, and the audit database survives the server being killed (SIGKILL) in the
middle of writes: every audit is there whole or not at all, every acknowledged write is there,
and the restarted server reads and writes it. Also: nothing secret in what the server logs."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import pytest
import sqlalchemy as sa

from app.main import ROOT

API_KEY = "fault-test-api-key-0123456789"
KILLS = 3  # per database backend
WRITERS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(run: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "app.cli", "serve", "--run", str(run), "--host", "127.0.0.1",
            "--port", str(port)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFLUENCE_")}
    return {**env, **extra}


def _request(port: int, method: str, path: str, body: Any = None, token: str | None = None,
             timeout: float = 30) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, (json.loads(data) if data else None)
    finally:
        conn.close()


@contextmanager
def _server(run: Path, db_url: str, log: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    port = _free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(_serve_cmd(run, port), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(INFLUENCE_DATABASE_URL=db_url, INFLUENCE_API_KEY=API_KEY))
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if _request(port, "GET", "/api/v1/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not healthy")
            time.sleep(0.1)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# a broken run is refused at start


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BREAKS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "missing store": ("grads.npy", lambda p: p.unlink()),
    "truncated store": ("grads.npy", _truncate),
    "garbled manifest": ("manifest.json", lambda p: p.write_text('{"n": 3, "dim":')),
    "missing curvature": ("curvature.pt", lambda p: p.unlink()),
    "garbage weights": ("model.pt", lambda p: p.write_bytes(b"not a tensor file" * 10)),
    "garbled run.json": ("run.json", lambda p: p.write_text("[1, 2")),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_a_broken_run_is_refused_at_start(run_path: Path, tmp_path: Path, case: str) -> None:
    name, damage = BREAKS[case]
    broken = tmp_path / "run"
    shutil.copytree(run_path, broken)
    damage(broken / name)
    proc = subprocess.run(_serve_cmd(broken, _free_port()), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env(), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("influence: error:"), proc.stderr
    assert name in lines[0] or (case == "missing store" and "gradient store" in lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# the audit database survives a kill mid-write


class Writers:
    """Threads that create audits (with ``k`` items each, k in the title) and add items to
    them, recording every write the server acknowledged (HTTP 201 with its body read)."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.seed = seed
        self.created: dict[str, int] = {}  # slug -> k initial items, acknowledged
        self.added: list[tuple[str, str]] = []  # (slug, note) of acknowledged added items
        self.tokens: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in range(WRITERS)]

    def _loop(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        mine: list[tuple[str, str]] = []
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                if mine and rng.random() < 0.4:
                    slug, token = rng.choice(mine)
                    note = f"add-{w}-{i}"
                    status, _ = _request(self.port, "POST", f"/api/v1/audits/{slug}/items",
                                         {"kind": "mislabel", "train_id": rng.randrange(90), "note": note},
                                         token=token)
                    if status == 201:
                        with self.lock:
                            self.added.append((slug, note))
                else:
                    k = rng.randint(1, 8)
                    items = [{"kind": "mislabel", "train_id": rng.randrange(90), "note": "init"}
                             for _ in range(k)]
                    status, body = _request(self.port, "POST", "/api/v1/audits",
                                            {"title": f"w{w}-{i} k={k}", "items": items}, token=API_KEY)
                    if status == 201:
                        with self.lock:
                            self.created[body["slug"]] = k
                            self.tokens.append(body["edit_token"])
                        mine.append((body["slug"], body["edit_token"]))
            except (OSError, http.client.HTTPException, ValueError):
                return  # the server is gone

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _database_state(db_url: str) -> tuple[dict[str, tuple[str, int, int]], set[tuple[str, str]]]:
    """slug -> (title, initial items, added items); and the (slug, note) of every added item."""
    url = sa.engine.make_url(db_url)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            audits = {row.id: (row.slug, row.title) for row in conn.execute(sa.text(
                "SELECT id, slug, title FROM audits"))}
            counts: dict[str, list[int]] = {slug: [0, 0] for slug, _ in audits.values()}
            notes: set[tuple[str, str]] = set()
            for row in conn.execute(sa.text("SELECT audit_id, note FROM audit_items")):
                slug = audits[row.audit_id][0]
                counts[slug][row.note != "init"] += 1
                if row.note != "init":
                    notes.add((slug, row.note))
            if eng.dialect.name == "sqlite":
                assert conn.execute(sa.text("PRAGMA integrity_check")).scalar() == "ok"
    finally:
        eng.dispose()
    return {slug: (title, *counts[slug]) for slug, title in audits.values()}, notes


def test_audits_survive_a_server_kill_mid_write(run_path: Path, db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    acknowledged: dict[str, int] = {}
    added: list[tuple[str, str]] = []
    tokens: list[str] = []
    rng = random.Random(7)
    for kill in range(KILLS):
        with _server(run_path, db_url, log) as (proc, port), Writers(port, seed=kill) as writers:
            deadline = time.monotonic() + 60  # a loaded machine: wait for the first writes to land
            while len(writers.created) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.2, 1.5))  # then kill at a random point among the writes
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        acknowledged.update(writers.created)
        added += writers.added
        tokens += writers.tokens
        state, notes = _database_state(db_url)
        assert writers.created, "no audit was written before the kill: the test tested nothing"
        for slug, (title, initial, _) in state.items():
            assert title.endswith(f"k={initial}"), f"{slug} ({title}) holds {initial} of its items"
        missing = set(acknowledged) - set(state)
        assert not missing, f"acknowledged audits lost: {sorted(missing)[:5]}"
        lost = set(added) - notes
        assert not lost, f"acknowledged items lost: {sorted(lost)[:5]}"
        print(f"kill {kill + 1}: {len(state)} audits in the database, {len(acknowledged)} acknowledged "
              f"(+{len(state) - len(acknowledged)} committed but unanswered), {len(added)} added items "
              f"acknowledged, none partial")  # shown with pytest -s

    # the restarted server reads every audit and still writes
    with _server(run_path, db_url, log) as (_, port):
        for slug, k in list(acknowledged.items())[:20]:
            status, body = _request(port, "GET", f"/api/v1/audits/{slug}")
            assert status == 200 and sum(it["note"] == "init" for it in body["items"]) == k
        status, body = _request(port, "POST", "/api/v1/audits", {"title": "after", "items": []}, token=API_KEY)
        assert status == 201

    logged = log.read_text(errors="replace")
    assert "POST /api/v1/audits" in logged  # the access log is on, and was read
    assert API_KEY not in logged
    assert not [t for t in tokens if t in logged], "an edit token reached the server's log"
