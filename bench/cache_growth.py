"""Server memory under requests whose parameters all differ: does the cache budget hold?

Serves a run (digits + logreg by default, built if missing) with ``influence serve`` in a
subprocess and reads its resident memory (VmRSS) from /proc. Then:

1. ``--requests`` sequential influence requests, each with distinct ``pool`` (1, 2, 3, …),
   ``fastif`` and ``top`` values and the IHVP method cycling over exact and cg (every kind of
   value a client can vary; before the bounded cache each pool value kept a copy of store rows
   forever): RSS before, after, and the growth against the documented 256 MB (the query caches'
   own budget, ``INFLUENCE_CACHE_MB``, is 192 MiB by default: the rest is what queries keep
   outside them, e.g. the allocator's retained memory after CG's per-query bases).
2. ``--burst`` concurrent first queries of the same new parameters on a fresh server: all answer
   the same body (each cache built once, whichever thread comes first, the others wait).

Prints a table and writes JSON (default bench/results/cache_growth.json).

    python bench/cache_growth.py                     # 1,000 requests, 16 concurrent
    python bench/cache_growth.py --requests 100 --burst 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_lib import ROOT, ensure_run, free_port, machine, start_server, stop_server, wait_healthy

BUDGET_MB = 256  # the documented growth of a served run under request-dependent load (docs/internals.md)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as r:
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")
        return r.read()


def distinct_requests(port: int, n: int, n_test: int, n_train: int) -> list[str]:
    paths = []
    for i in range(n):
        pool = 1 + i % (n_train - 1)
        fastif = 50 + (7 * i) % 400
        top = 1 + (13 * i) % min(fastif, 500)
        ihvp = ("exact", "cg")[i % 2]
        paths.append(f"/api/v1/test-points/{i % n_test}/influence?top={top}&fastif={fastif}"
                     f"&pool={pool}&ihvp={ihvp}")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "digits-logreg")
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_growth.json")
    a = ap.parse_args()
    ensure_run(a.run, a.model)
    out: dict = {"machine": machine(), "run": str(a.run), "budget_mb": BUDGET_MB}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"INFLUENCE_DATABASE_URL": f"sqlite:///{tmp}/audits.sqlite3",
               **{k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "INFLUENCE_CACHE"))}}
        port = free_port()
        with open(Path(tmp) / "server.log", "w") as log:
            proc = start_server(a.run, port, log, env)
            try:
                health = wait_healthy(proc, port)
                n_test, n_train = health["n_test"], health["n_train"]
                get(port, "/api/v1/test-points/0/influence?top=10&fastif=50&pool=1")  # warm: caches, solver
                get(port, "/api/v1/test-points/0/influence?top=10&ihvp=cg")
                before = rss_mb(proc.pid)
                t = time.perf_counter()
                peak = before
                for k, path in enumerate(distinct_requests(port, a.requests, n_test, n_train)):
                    get(port, path)
                    if k % 50 == 0:
                        peak = max(peak, rss_mb(proc.pid))
                after = rss_mb(proc.pid)
                out["distinct"] = {"requests": a.requests, "seconds": time.perf_counter() - t,
                                   "rss_before_mb": before, "rss_after_mb": after,
                                   "rss_peak_mb": max(peak, after), "growth_mb": after - before,
                                   "within_budget": after - before <= BUDGET_MB}
            finally:
                stop_server(proc)
            # a fresh server, then `burst` identical first queries at once
            port = free_port()
            proc = start_server(a.run, port, log, env)
            try:
                wait_healthy(proc, port)
                path = "/api/v1/test-points/3/influence?top=7&fastif=120&pool=33"
                bodies: list[bytes] = []
                barrier = threading.Barrier(a.burst)

                def worker() -> None:
                    barrier.wait()
                    bodies.append(get(port, path))

                threads = [threading.Thread(target=worker) for _ in range(a.burst)]
                t = time.perf_counter()
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                same = len(bodies) == a.burst and all(b == bodies[0] for b in bodies)
                out["burst"] = {"concurrent": a.burst, "answered": len(bodies), "identical": same,
                                "seconds": time.perf_counter() - t}
            finally:
                stop_server(proc)
    d, b = out["distinct"], out["burst"]
    print(f"{'check':<34}{'value':>14}")
    print(f"{'requests with distinct parameters':<34}{d['requests']:>14}")
    print(f"{'RSS before / after (MB)':<34}{d['rss_before_mb']:>7.0f} / {d['rss_after_mb']:<5.0f}")
    print(f"{'growth (MB) vs budget':<34}{d['growth_mb']:>7.1f} / {BUDGET_MB:<5}")
    print(f"{'concurrent first queries':<34}{b['concurrent']:>14}")
    print(f"{'identical answers':<34}{b['identical']!s:>14}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
