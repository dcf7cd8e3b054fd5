"""Load benchmark: latency and throughput of the dashboard's REST routes under concurrent clients.

Serves a run (built first if missing: digits + cnn by default) with ``influence serve`` in a
subprocess, then N asyncio clients, each on its own persistent HTTP/1.1 keep-alive connection,
loop for ``--duration`` seconds over random test ids (seeded) and time each request from write to
full body. Each route gets an unmeasured warm-up at its highest concurrency first.

    influence   GET /api/v1/test-points/{id}/influence?top=K   swept over --concurrency
    test-point  GET /api/v1/test-points/{id}                    at concurrency 1 and the max
    image       GET /api/v1/images/test/{id}.png                at concurrency 1 and the max

How to read it: p50 at concurrency 1 is one request's latency on an idle server (the target is
under 20 ms for influence on a cnn digits run); as concurrency grows, throughput should level off
at what the server's CPUs can do while p50/p99 grow with queueing. Clients run on the same
machine, so on few cores they take CPU from the server. A non-200 answer, or a 200 whose body does
not validate (influence: JSON with ``helpful`` and ``harmful`` lists of length K), is an error.
After the server stops, ``run.explain`` is timed in-process for comparison (engine vs HTTP cost).
Prints a table and writes JSON (default bench/results/load.json), the server's output
next to it (load.server.log).

    python bench/load_bench.py                                   # full sweep, 10 s per step
    python bench/load_bench.py --concurrency 1,8 --duration 3 --routes influence
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
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

ROUTES = ("influence", "test-point", "image")
TIMING_HEADERS = ("server-timing", "x-process-time")  # read if the server ever sends them


# ---------------------------------------------------------------------------------------------
# routes and one measured step


def route_path(route: str, test_id: int, top: int) -> str:
    if route == "influence":
        return f"/api/v1/test-points/{test_id}/influence?top={top}"
    if route == "test-point":
        return f"/api/v1/test-points/{test_id}"
    if route == "image":
        return f"/api/v1/images/test/{test_id}.png"
    raise ValueError(f"unknown route {route!r}: choose from {', '.join(ROUTES)}")


def valid_body(route: str, body: bytes, top: int) -> bool:
    """Whether a 200 body has the route's shape."""
    if route == "image":
        return body.startswith(PNG_MAGIC)
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    if route == "influence":
        return all(isinstance(doc.get(k), list) and len(doc[k]) == top for k in ("helpful", "harmful"))
    return isinstance(doc, dict) and "test_id" in doc


def server_ms(headers: dict[str, str]) -> float | None:
    """The server's own time for a request, from a Server-Timing ``dur=`` or X-Process-Time header."""
    for name in TIMING_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        try:
            if name == "server-timing":
                return sum(float(p.split("=", 1)[1]) for p in value.replace(",", ";").split(";")
                           if p.strip().startswith("dur="))
            return 1e3 * float(value)  # X-Process-Time is in seconds
        except ValueError:
            return None
    return None


@dataclass
class Tally:
    """What the clients of one step saw."""
    latencies_s: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    first_error: str | None = None
    reconnects: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.first_error = self.first_error or detail


async def client(*, port: int, route: str, top: int, n_test: int, seed: int, deadline: float,
                 tally: Tally) -> None:
    """One client: requests back to back on one connection until ``deadline``."""
    rng = random.Random(seed)
    conn = Connection(port)
    try:
        while time.perf_counter() < deadline:
            path = route_path(route, rng.randrange(n_test), top)
            t = time.perf_counter()
            try:
                status, headers, body = await conn.get(path)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                tally.error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                await conn.close()
                continue
            tally.latencies_s.append(time.perf_counter() - t)
            if status != 200:
                tally.error(f"HTTP {status}", f"HTTP {status} for {path}: {body[:200]!r}")
            elif not valid_body(route, body, top):
                tally.error("bad body", f"bad body for {path}: {body[:200]!r}")
            if (ms := server_ms(headers)) is not None:
                tally.server_ms.append(ms)
    finally:
        tally.reconnects += conn.reconnects
        await conn.close()


async def load(*, port: int, route: str, concurrency: int, duration: float, top: int, n_test: int,
               seed: int) -> tuple[Tally, float]:
    """``concurrency`` clients for ``duration`` seconds; returns the tally and the wall time."""
    tally = Tally()
    t = time.perf_counter()
    await asyncio.gather(*(client(port=port, route=route, top=top, n_test=n_test, seed=seed + c,
                                  deadline=t + duration, tally=tally)
                           for c in range(concurrency)))
    return tally, time.perf_counter() - t


def summarize(route: str, concurrency: int, tally: Tally, wall_s: float) -> dict:
    ms = 1e3 * np.array(tally.latencies_s or [np.nan])
    row = {"route": route, "concurrency": concurrency, "requests": len(tally.latencies_s),
           "errors": sum(tally.errors.values()), "p50_ms": float(np.percentile(ms, 50)),
           "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
           "max_ms": float(np.max(ms)), "throughput_rps": len(tally.latencies_s) / wall_s,
           "wall_s": wall_s, "error_kinds": dict(tally.errors), "first_error": tally.first_error,
           "reconnects": tally.reconnects}
    if tally.server_ms:
        row["server_p50_ms"] = float(np.median(tally.server_ms))
    return row


def plan(routes: list[str], sweep: list[int]) -> list[tuple[str, list[int]]]:
    """Concurrency levels per route: the whole sweep for influence, 1 and the max for others."""
    ends = sorted({1, max(sweep)})
    return [(r, sweep if r == "influence" else ends) for r in routes]


def measure(*, port: int, routes: list[str], sweep: list[int], duration: float, warmup: float,
            top: int, n_test: int, seed: int) -> list[dict]:
    rows = []
    for route, levels in plan(routes, sweep):
        if warmup > 0:
            asyncio.run(load(port=port, route=route, concurrency=max(levels), duration=warmup,
                             top=top, n_test=n_test, seed=seed - 1_000))
        for c in levels:
            tally, wall_s = asyncio.run(load(port=port, route=route, concurrency=c,
                                             duration=duration, top=top, n_test=n_test, seed=seed))
            rows.append(summarize(route, c, tally, wall_s))
            print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# in-process reference and output


def engine_explain_ms(run: Path, *, top: int, n_test: int, seed: int, repeats: int = 200) -> dict:
    """``run.explain(i, top)`` timed in this process (no HTTP), after 20 warm-up calls."""
    import torch

    import engine

    r = engine.open_run(run)
    rng = random.Random(seed)
    for _ in range(20):
        r.explain(rng.randrange(n_test), top=top)
    times = []
    for _ in range(repeats):
        i = rng.randrange(n_test)
        t = time.perf_counter()
        r.explain(i, top=top)
        times.append(1e3 * (time.perf_counter() - t))
    return {"calls": repeats, "p50_ms": float(np.median(times)),
            "p99_ms": float(np.percentile(times, 99)), "torch_threads": torch.get_num_threads()}


HEADER = (f"{'route':<11} {'conc':>4} {'requests':>8} {'errors':>6} {'p50 ms':>7} {'p90 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'req/s':>7}")


def format_row(r: dict) -> str:
    return (f"{r['route']:<11} {r['concurrency']:>4} {r['requests']:>8} {r['errors']:>6} "
            f"{r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['max_ms']:>7.1f} "
            f"{r['throughput_rps']:>7.1f}")


def print_report(rows: list[dict], server: list[tuple], in_process: dict | None, *, top: int
                 ) -> None:
    print(f"\n{HEADER}\n{'-' * len(HEADER)}")
    for r in rows:
        print(format_row(r))
    for r in rows:
        if r["first_error"]:
            print(f"{r['route']} x{r['concurrency']}: errors {r['error_kinds']}, "
                  f"first: {r['first_error']}")
    for route, c, ms in server:
        print(f"server-reported p50, {route} x{c}: {ms:.1f} ms")
    if in_process:
        print(f"in-process run.explain(i, top={top}): p50 {in_process['p50_ms']:.1f} ms, "
              f"p99 {in_process['p99_ms']:.1f} ms ({in_process['torch_threads']} torch threads)")



def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "digits-cnn")
    ap.add_argument("--model", default="cnn", help="model to build the run with if it is missing")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured step")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per route")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--routes", "--route", dest="routes", default=",".join(ROUTES),
                    help=f"comma-separated routes to measure ({', '.join(ROUTES)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--no-engine", action="store_true", help="skip the in-process run.explain timing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = ap.parse_args()
    args.sweep = [int(c) for c in args.concurrency.split(",")]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    bad = [r for r in args.routes if r not in ROUTES]
    if bad or not args.routes or min(args.sweep) < 1:
        ap.error(f"routes must be among {', '.join(ROUTES)} and concurrency levels positive")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # still stop the server
    run = args.run if args.run.is_absolute() else Path.cwd() / args.run
    ensure_run(run, args.model)
    port = args.port or free_port()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".server.log")
    with log_path.open("w") as log:
        proc = start_server(run, port, log)
        try:
            health = wait_healthy(proc, port)
            print(f"serving {run} on port {port} (log: {log_path}): {health}", file=sys.stderr,
                  flush=True)
            print(HEADER, file=sys.stderr)
            rows = measure(port=port, routes=args.routes, sweep=args.sweep, duration=args.duration,
                           warmup=args.warmup, top=args.top, n_test=health["n_test"], seed=args.seed)
        except Exception:
            print(f"--- server log (tail) ---\n{log_path.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            stop_server(proc)
    in_process = None if args.no_engine else engine_explain_ms(
        run, top=args.top, n_test=health["n_test"], seed=args.seed)
    server = [(r["route"], r["concurrency"], r["server_p50_ms"]) for r in rows if "server_p50_ms" in r]
    print_report(rows, server, in_process, top=args.top)
    result = {"machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "run": {"path": str(run), **health},
              "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
              "rows": rows, "server_timing": server or None, "engine_explain": in_process,
              "server_log": str(log_path)}
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
