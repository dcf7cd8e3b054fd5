"""Mixed load: many clients on loopback hitting what a team does at once, for a fixed time.

Serves a run (built first if missing: digits + cnn by default) with ``influence serve`` in a
subprocess, with an API key and its own throwaway audit database, then ``--clients`` asyncio
clients (each on its own keep-alive connection) loop for ``--duration`` seconds, each request
drawn (seeded) from this mix:

    influence   GET  /api/v1/test-points/{id}/influence?top=10       (the JSON must have 2×10 rows)
    upload      POST /api/v1/query?top=10, a PNG digit (multipart)    (prediction + 2×10 rows)
    page        GET  /test-points/{id}, /, /mislabels                  (HTML)
    image       GET  /api/v1/images/test/{id}.png                      (a PNG)
    audit-new   POST /api/v1/audits with a test point and a mislabel mark (needs the API key)
    audit-add   POST /api/v1/audits/{slug}/items to the client's own audit (its edit token)
    audit-read  GET  /audits/{slug} (the permalink page)

With ``--job`` a validation job (a training-set attack, which retrains the model at each step)
is started after a third of the time and polled to the end, and the influence latencies while it
runs are reported beside those when no job runs: the server must stay responsive meanwhile.
Any non-2xx answer, a dropped connection, or a body without its expected shape is an error.
Prints a table per kind and writes JSON (default bench/results/mixed_load.json).

    python bench/mixed_load.py                        # 50 clients, 60 s, with a job
    python bench/mixed_load.py --clients 8 --duration 5 --no-job
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_lib import (
    PNG_MAGIC,
    ROOT,
    Connection,
    ensure_run,
    free_port,
    machine,
    start_server,
    stop_server,
    wait_healthy,
)

MIX = {"influence": 35, "upload": 10, "page": 20, "image": 10, "audit-new": 5, "audit-add": 10,
       "audit-read": 10}
TOP = 10
API_KEY = "mixed-load-api-key-" + secrets.token_hex(8)
BOUNDARY = "influence-load-boundary"


def png_upload(run: Path, index: int) -> bytes:
    """A multipart body with one test image of the run as a PNG file."""
    sys.path.insert(0, str(ROOT))
    import engine
    from app.images import png_bytes

    r = engine.open_run(run)
    png = png_bytes(np.asarray(r.dataset.x_test[index]))
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    during_job: list[float] = field(default_factory=list)  # influence latencies while a job ran
    outside_job: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)
    job: dict | None = None

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.first_errors.setdefault(kind, detail)


class JobWindow:
    """When the validation job ran (perf_counter times)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None

    def covers(self, t0: float, t1: float) -> bool:
        return self.start is not None and t0 >= self.start and (self.end is None or t1 <= self.end)


def _ok(kind: str, status: int, body: bytes) -> bool:
    if kind in ("audit-new", "audit-add"):
        return status == 201
    if status != 200:
        return False
    if kind == "image":
        return body.startswith(PNG_MAGIC)
    if kind in ("page", "audit-read"):
        return body.lstrip().lower().startswith(b"<!doctype html")
    doc = json.loads(body)
    return all(isinstance(doc.get(k), list) and len(doc[k]) == TOP for k in ("helpful", "harmful"))


async def client(c: int, *, port: int, n_test: int, n_train: int, upload: bytes, deadline: float,
                 seed: int, stats: Stats, window: JobWindow) -> None:
    rng = random.Random(seed * 1000 + c)
    kinds, weights = zip(*MIX.items())
    conn = Connection(port)
    audit: tuple[str, str] | None = None  # (slug, edit token) of this client's audit
    json_type = {"Content-Type": "application/json"}
    try:
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            if kind.startswith("audit-") and kind != "audit-new" and audit is None:
                kind = "audit-new"
            i = rng.randrange(n_test)
            method, body, headers = "GET", b"", {}
            if kind == "influence":
                path = f"/api/v1/test-points/{i}/influence?top={TOP}"
            elif kind == "upload":
                method, path, body = "POST", f"/api/v1/query?top={TOP}", upload
                headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
            elif kind == "page":
                path = rng.choice([f"/test-points/{i}", "/", "/mislabels"])
            elif kind == "image":
                path = f"/api/v1/images/test/{i}.png"
            elif kind == "audit-new":
                method, path = "POST", "/api/v1/audits"
                headers = {**json_type, "Authorization": f"Bearer {API_KEY}"}
                body = json.dumps({"title": f"load {c}", "items": [
                    {"kind": "test_point", "test_id": i, "top": 5},
                    {"kind": "mislabel", "train_id": rng.randrange(n_train), "note": "load"}]}).encode()
            elif kind == "audit-add":
                assert audit is not None
                method, path = "POST", f"/api/v1/audits/{audit[0]}/items"
                headers = {**json_type, "Authorization": f"Bearer {audit[1]}"}
                body = json.dumps({"kind": "mislabel", "train_id": rng.randrange(n_train)}).encode()
            else:
                assert audit is not None
                path = f"/audits/{audit[0]}"
            t0 = time.perf_counter()
            try:
                status, _, answer = await conn.request(method, path, body, headers)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                stats.error(kind, f"{type(exc).__name__}: {exc} ({method} {path})")
                await conn.close()
                continue
            t1 = time.perf_counter()
            try:
                ok = _ok(kind, status, answer)
            except ValueError:
                ok = False
            if not ok:
                stats.error(kind, f"HTTP {status} for {method} {path}: {answer[:200]!r}")
                continue
            stats.latencies[kind].append(t1 - t0)
            if kind == "influence":
                (stats.during_job if window.covers(t0, t1) else stats.outside_job).append(t1 - t0)
            if kind == "audit-new":
                made = json.loads(answer)
                audit = (made["slug"], made["edit_token"])
    finally:
        await conn.close()


async def job(*, port: int, start_at: float, deadline: float, stats: Stats, window: JobWindow) -> None:
    """Start one attack job at ``start_at`` and poll it until it ends (or the load does)."""
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    conn = Connection(port)
    try:
        body = json.dumps({"test_id": 0, "n_points": 20, "iterations": 50}).encode()
        status, _, answer = await conn.request("POST", "/api/v1/attacks", body, {
            "Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        if status != 202:
            stats.error("job", f"HTTP {status} starting the job: {answer[:200]!r}")
            return
        window.start = time.perf_counter()
        url = json.loads(answer)["url"]
        state = json.loads(answer)
        while time.perf_counter() < deadline and state["status"] in ("queued", "running"):
            await asyncio.sleep(0.5)
            status, _, answer = await conn.request("GET", url)
            if status != 200:
                stats.error("job", f"HTTP {status} polling the job: {answer[:200]!r}")
                return
            state = json.loads(answer)
        window.end = time.perf_counter()
        stats.job = {"status": state["status"], "seconds": state["seconds"],
                     "progress": state["progress"], "error": state.get("error")}
        if state["status"] == "error":
            stats.error("job", f"the job failed: {state.get('error')}")
    finally:
        await conn.close()


WARM_UP = ["/", "/mislabels", "/test-points/0", f"/api/v1/test-points/0/influence?top={TOP}"]


async def warm_up(port: int, upload: bytes) -> None:
    """One unmeasured request of each kind, so that caches the server fills once (self-influence
    for the mislabel page, the first query's solver) are not counted as load."""
    conn = Connection(port)
    try:
        for path in WARM_UP:
            await conn.get(path)
        await conn.request("POST", f"/api/v1/query?top={TOP}", upload,
                           {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    finally:
        await conn.close()


async def run_load(*, port: int, clients: int, duration: float, n_test: int, n_train: int,
                   upload: bytes, seed: int, with_job: bool) -> tuple[Stats, float]:
    await warm_up(port, upload)
    stats, window = Stats(), JobWindow()
    t = time.perf_counter()
    deadline = t + duration
    tasks = [client(c, port=port, n_test=n_test, n_train=n_train, upload=upload, deadline=deadline,
                    seed=seed, stats=stats, window=window) for c in range(clients)]
    if with_job:
        tasks.append(job(port=port, start_at=t + duration / 3, deadline=deadline, stats=stats,
                         window=window))
    await asyncio.gather(*tasks)
    return stats, time.perf_counter() - t


def _pcts(seconds: list[float]) -> dict:
    ms = 1e3 * np.array(seconds or [np.nan])
    return {"requests": len(seconds), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(np.max(ms))}


def summarize(stats: Stats, wall_s: float) -> dict:
    rows = [{"kind": k, **_pcts(stats.latencies.get(k, [])), "errors": stats.errors.get(k, 0),
             "throughput_rps": len(stats.latencies.get(k, [])) / wall_s} for k in MIX]
    everything = [x for v in stats.latencies.values() for x in v]
    total = {"kind": "all", **_pcts(everything), "errors": sum(stats.errors.values()),
             "throughput_rps": len(everything) / wall_s}
    return {"rows": rows, "total": total, "wall_s": wall_s, "errors": dict(stats.errors),
            "first_errors": stats.first_errors, "job": stats.job,
            "influence_during_job": _pcts(stats.during_job),
            "influence_outside_job": _pcts(stats.outside_job)}


HEADER = (f"{'kind':<11} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'req/s':>7}")


def print_report(result: dict) -> None:
    print(f"\n{HEADER}\n{'-' * len(HEADER)}")
    for r in [*result["rows"], result["total"]]:
        print(f"{r['kind']:<11} {r['requests']:>8} {r['errors']:>6} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['max_ms']:>8.1f} {r['throughput_rps']:>7.1f}")
    if result["job"]:
        d, o = result["influence_during_job"], result["influence_outside_job"]
        print(f"\nvalidation job: {result['job']['status']} after {result['job']['seconds']:.1f} s "
              f"({result['job']['progress']['done']}/{result['job']['progress']['total']} steps)")
        print(f"influence while the job ran: {d['requests']} requests, p50 {d['p50_ms']:.1f} ms, "
              f"p99 {d['p99_ms']:.1f} ms; otherwise: {o['requests']}, p50 {o['p50_ms']:.1f} ms, "
              f"p99 {o['p99_ms']:.1f} ms")
    for kind, detail in result["first_errors"].items():
        print(f"first {kind} error: {detail}")


def measure(run: Path, *, clients: int, duration: float, seed: int, with_job: bool,
            log_path: Path) -> dict:
    """Serve ``run`` in a subprocess and load it; the result as :func:`summarize` gives it."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mixed-load-") as tmp, log_path.open("w") as log:
        env = {"INFLUENCE_API_KEY": API_KEY, "INFLUENCE_DATABASE_URL": f"sqlite:///{tmp}/audits.sqlite3"}
        proc = start_server(run, port, log, env=env)
        try:
            health = wait_healthy(proc, port)
            upload = png_upload(run, 0)
            stats, wall = asyncio.run(run_load(port=port, clients=clients, duration=duration,
                                               n_test=health["n_test"], n_train=health["n_train"],
                                               upload=upload, seed=seed, with_job=with_job))
        except Exception:
            print(f"--- server log (tail) ---\n{log_path.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            stop_server(proc)
    return {**summarize(stats, wall), "health": health}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "digits-cnn")
    ap.add_argument("--model", default="cnn", help="model to build the run with if it is missing")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-job", dest="job", action="store_false", help="no validation job during the load")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixed_load.json")
    args = ap.parse_args()
    if args.clients < 1 or args.duration <= 0:
        ap.error("--clients and --duration must be positive")
    run = args.run if args.run.is_absolute() else Path.cwd() / args.run
    ensure_run(run, args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = measure(run, clients=args.clients, duration=args.duration, seed=args.seed,
                     with_job=args.job, log_path=args.out.with_suffix(".server.log"))
    print_report(result)
    result.update(machine=machine(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  settings={"run": str(run), "clients": args.clients, "duration": args.duration,
                            "seed": args.seed, "job": args.job, "mix": MIX})
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    sys.exit(1 if result["total"]["errors"] else 0)


if __name__ == "__main__":
    main()
