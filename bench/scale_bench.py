"""Issue 13's scale figures: a user's ResNet-18 and the built-in cnn built on 32×32 RGB images.

Two cases, each built by :func:`engine.build` in its own subprocess (so its peak RSS, VmHWM read
right after the build, is the build's own):

- ``resnet``: ``--model bench.scale_models:resnet18 --weights W --projection kronecker --project K
  --ihvp fisher --store-dtype float16 [--kronecker-basis pca]`` (11.2M parameters, BatchNorm in eval mode). The store
  stage's rate is n / ``gradients_s`` of run.json; right after, the same process times a plain
  forward + backward (mean loss, parameter gradients, eval mode) of the same model at the
  Kronecker path's batch (256), and — interleaved batch by batch, robust to a shared machine —
  one store batch (:meth:`GradientSpace.rows`) against one plain batch.
- ``cnn``: the built-in ``cnn`` with default settings (only data, model, out): total build time,
  the IHVP method ``auto`` chose, the store rate beside a plain forward + backward at its chunk.

Then a fresh process opens the run (as the dashboard does) and times ``run.explain`` (the first
call, which factors the curvature, and a second) and one API answer through FastAPI's TestClient
(GET /api/v1/test-points/{i}/influence?top=10, the first and a second), within --query-timeout.
Each build runs under an address-space limit (--memory-gb) so that a build which would exhaust
the shared machine fails instead. The data are seeded synthetic 32×32 RGB images (class-coloured
blobs + noise, learnable) in a temporary .npz. The load average (``/proc/loadavg``) is noted:
the machine is shared. Prints a table and writes JSON (default bench/results/scale_bench.json).

    python bench/scale_bench.py                 # n = 5000, K = 4096
    python bench/scale_bench.py --n 500         # a quick smoke run
    python bench/scale_bench.py --cases cnn --n 2000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("resnet", "cnn")
KRONECKER_BATCH = 256  # GradientSpace.rows caps the layer-wise path's chunk at 256
TARGETS = {"peak_rss_gb": 4.0, "ratio": 0.5, "cnn_build_s": 600.0}


def write_images(path: Path, *, n_train: int, n_test: int, classes: int = 10, seed: int = 0) -> Path:
    """Seeded 32×32 RGB uint8 images: class c is a blob of colour c near position c on noise."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.2, 1.0, size=(classes, 3))  # (C, 3)
    centres = rng.uniform(8, 24, size=(classes, 2))  # (C, 2) row, column
    yy, xx = np.mgrid[0:32, 0:32]  # (32, 32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        c = centres[y] + rng.normal(scale=2.0, size=(n, 2))  # (n, 2) jittered centres
        d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2  # (n, 32, 32)
        blob = np.exp(-d2 / (2 * 4.0**2))[..., None] * colours[y][:, None, None, :]  # (n, 32, 32, 3)
        x = 0.6 * blob + rng.uniform(0, 0.4, size=blob.shape)  # (n, 32, 32, 3)
        return (np.clip(x, 0, 1) * 255).astype(np.uint8), y

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    np.savez(path, X_train=x_train, y_train=y_train, X_test=x_test, y_test=y_test)
    return path


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def vm_hwm_bytes() -> int:
    """This process's peak resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _plain_and_paired(run: Any, model: Any, *, batch: int, batches: int) -> dict[str, Any]:
    """Plain forward + backward of ``model`` (b = batch) and, interleaved with it, one batch of the
    run's store rows (GradientSpace.rows): medians over ``batches`` pairs after a warm-up."""
    from engine.models.losses import cross_entropy

    x = run.data.x_train[:batch]  # (b, H, W, C)
    y = run.data.y_train[:batch]  # (b,)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()

    def store() -> None:
        run.store.space.rows(x, y, chunk=batch)  # (b, d)

    times: dict[str, list[float]] = {"plain": [], "store": []}
    plain(), store()  # warm-up
    for _ in range(batches):
        for name, fn in (("plain", plain), ("store", store)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: _median(v) for k, v in times.items()}
    return {"batch": len(x), "plain_images_per_s": len(x) / med["plain"],
            "paired_store_images_per_s": len(x) / med["store"],
            "paired_ratio": med["plain"] / med["store"], "seconds": times, "load": loadavg()}


def _queries(run: Any, out: Path, *, top: int) -> dict[str, Any]:
    """run.explain and one API answer, each the first call (curvature factored) and a second."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    res: dict[str, Any] = {}
    for i, label in ((0, "explain_first_ms"), (1, "explain_ms")):
        t = time.perf_counter()
        found = run.explain(i, top=top)
        res[label] = 1000 * (time.perf_counter() - t)
    res["explain_load"] = loadavg()
    res["explain_top_harmful"] = [h["train_id"] for h in found["harmful"][:3]]
    settings = Settings(run=out, database_url=f"sqlite:///{out.parent / 'audits.sqlite3'}")
    with TestClient(create_app(settings)) as client:
        for i, label in ((0, "api_first_ms"), (1, "api_ms")):
            t = time.perf_counter()
            r = client.get(f"/api/v1/test-points/{i}/influence", params={"top": top})
            res[label] = 1000 * (time.perf_counter() - t)
            res["api_status"] = r.status_code
            if r.status_code != 200:
                res["api_error"] = r.text[:500]
    res["api_load"] = loadavg()
    return res


def worker(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this (fresh) process: build, peak RSS, plain rate, queries."""
    import torch

    import engine

    tmp = Path(args.tmp)
    out = tmp / f"run-{case}"
    res: dict[str, Any] = {"case": case, "threads": torch.get_num_threads(), "load_before": loadavg()}
    if case == "resnet":
        model_spec = "bench.scale_models:resnet18"
        options = {"weights": str(tmp / "resnet18.pt"), "projection": "kronecker", "project": args.k,
                   "ihvp": "fisher", "store_dtype": "float16", "kronecker_basis": args.kronecker_basis}
        batch = KRONECKER_BATCH
    else:
        model_spec, options = "cnn", {}
        batch = 512  # the default chunk of the per-sample-gradient path
    if args.memory_gb:  # a build that would exhaust the shared machine fails here instead
        import resource

        limit = int(args.memory_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t = time.perf_counter()
    try:
        run = engine.build(str(tmp / "images.npz"), model_spec, out, progress=args.progress, **options)
    except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory is a RuntimeError
        return {**res, "error": f"build failed after {time.perf_counter() - t:.0f} s at peak RSS "
                                f"{vm_hwm_bytes() / 1e9:.2f} GB ({args.memory_gb:g} GB address-space "
                                f"limit): {type(exc).__name__}: {str(exc)[:200]}"}
    res["build_s"] = time.perf_counter() - t
    res["peak_rss_bytes"] = vm_hwm_bytes()
    res["load_after_build"] = loadavg()
    info = json.loads((out / "run.json").read_text())
    res.update(params=info["model"]["n_params"], method=info["curvature"]["method"],
               method_requested=info["plan"]["ihvp_requested"], timings=info["timings"],
               plan={"seconds": sum(st["seconds"] for st in info["plan"]["stages"]),
                     "stages": info["plan"]["stages"]},
               training=info["training"], store_dim=info["store"].get("dim"),
               store_bytes=(out / "grads.npy").stat().st_size, n_train=info["data"]["n_train"])
    res["store_images_per_s"] = res["n_train"] / info["timings"]["gradients_s"]
    if case == "resnet":
        from bench.scale_models import resnet18

        model = resnet18(run.dataset.n_classes, 3)
        model.load_state_dict(torch.load(tmp / "resnet18.pt", weights_only=True))
    else:
        model = run.model.objective.model
    model = model.to(run.model.dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    res.update(_plain_and_paired(run, model, batch=batch, batches=args.batches))
    res["ratio"] = res["store_images_per_s"] / res["plain_images_per_s"]
    res["peak_rss_bytes_end"] = vm_hwm_bytes()
    return res


def query_worker(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """The built run opened afresh (as the dashboard opens it) and queried."""
    import engine

    out = Path(args.tmp) / f"run-{case}"
    t = time.perf_counter()
    run = engine.open_run(out)
    return {"open_ms": 1000 * (time.perf_counter() - t), **_queries(run, out, top=10)}


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _ms(r: dict[str, Any], first: str, second: str) -> str:
    """'first/second' call in ms, or why there is none."""
    if "query_error" in r:
        return "timeout"
    return f"{r[first]:.0f}/{r[second]:.0f}"


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'model':<7} {'params':>11} {'method':<12} {'store img/s':>11} {'plain img/s':>11} "
            f"{'ratio':>5} {'paired':>6} {'peak RSS':>9} {'store':>8} {'query ms':>11} {'API ms':>9} "
            f"{'build s':>7}  load at build end")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<7} failed: {r['error']}")
            continue
        method = r["method"] + (" (auto)" if r["method_requested"] == "auto" else "")
        lines.append(
            f"{r['case']:<7} {r['params']:>11,} {method:<12} {r['store_images_per_s']:>11.1f} "
            f"{r['plain_images_per_s']:>11.1f} {r['ratio']:>5.2f} {r['paired_ratio']:>6.2f} "
            f"{_gb(r['peak_rss_bytes']):>9} {r['store_bytes'] / 1e6:>5.0f} MB "
            f"{_ms(r, 'explain_first_ms', 'explain_ms'):>11} {_ms(r, 'api_first_ms', 'api_ms'):>9} "
            f"{r['build_s']:>7.0f}  {r['load_after_build']}")
    lines.append("query ms, API ms: the first call (which factors the curvature) / a second one; "
                 "ratio: store stage (n / gradients_s) over plain; paired: one batch each, interleaved")
    return "\n".join(lines)


def checks(results: list[dict[str, Any]], *, full: bool) -> list[str]:
    """Each target against its figure (the targets are set for the full sizes)."""
    out = []
    for r in results:
        if "error" in r:
            out.append(f"{r['case']}: MISSED (the build failed)")
            continue
        if r["case"] == "resnet":
            gb = r["peak_rss_bytes"] / 1e9
            out.append(f"resnet peak RSS {gb:.2f} GB < {TARGETS['peak_rss_gb']:g} GB: "
                       f"{'met' if gb < TARGETS['peak_rss_gb'] else 'MISSED'}")
            out.append(f"resnet store/plain ratio {r['ratio']:.2f} (paired {r['paired_ratio']:.2f}) "
                       f">= {TARGETS['ratio']:g}: {'met' if r['ratio'] >= TARGETS['ratio'] else 'MISSED'}")
        else:
            out.append(f"cnn build {r['build_s']:.0f} s < {TARGETS['cnn_build_s']:g} s: "
                       f"{'met' if r['build_s'] < TARGETS['cnn_build_s'] else 'MISSED'}")
        out.append(f"{r['case']} queries: " + (r["query_error"] if "query_error" in r
                                                else f"API status {r['api_status']}"))
    if not full:
        out.append("(not the full sizes: the targets are for n = 5000, K = 4096)")
    return out


def _child(flags: list[str], *, tmp: str, timeout: float | None) -> dict[str, Any]:
    """Run this script with ``flags`` in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags, "--tmp", tmp]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"query_error": f"timed out after {timeout:g} s", "query_load": loadavg()}
    if proc.returncode != 0:
        return {"error": f"{flags[0].strip('-')} exited {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="training images (5000)")
    ap.add_argument("--n-test", type=int, default=None, help="test images (n / 10)")
    ap.add_argument("--k", type=int, default=4096, help="resnet store dimension K (4096)")
    ap.add_argument("--batches", type=int, default=3, help="timed plain/store batch pairs (3)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: resnet, cnn")
    ap.add_argument("--kronecker-basis", default="random", help="the resnet's Kronecker bases: random or pca")
    ap.add_argument("--progress", action="store_true", help="the build's plan and progress bars")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale_bench.json"))
    ap.add_argument("--query-timeout", type=float, default=300,
                    help="seconds the queries of one case may take (300)")
    ap.add_argument("--memory-gb", type=float, default=16,
                    help="address-space limit of each build process in GB (16; 0: none)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--query-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.query_worker:
        print(json.dumps(query_worker(args.query_worker, args)))
        return
    cases = [c for c in args.cases.split(",") if c]
    n_test = args.n_test or max(20, args.n // 10)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        write_images(Path(tmp) / "images.npz", n_train=args.n, n_test=n_test)
        if "resnet" in cases:
            sys.path.insert(0, str(ROOT))
            from bench.scale_models import save_weights

            x = np.load(Path(tmp) / "images.npz")["X_train"]
            save_weights(Path(tmp) / "resnet18.pt", x=x, n_classes=10)
        for case in cases:
            print(f"{case}: building ({args.n} images, load {loadavg()})", file=sys.stderr)
            res = _child(["--worker", case, "--k", str(args.k), "--batches", str(args.batches),
                          "--memory-gb", str(args.memory_gb), "--kronecker-basis", args.kronecker_basis]
                         + (["--progress"] if args.progress else []),
                         tmp=tmp, timeout=None)
            res.setdefault("case", case)
            if "error" not in res:
                print(f"{case}: querying (load {loadavg()})", file=sys.stderr)
                res.update(_child(["--query-worker", case], tmp=tmp, timeout=args.query_timeout))
            results.append(res)
    full = args.n >= 5000 and args.k == 4096
    text = table(results)
    print(text)
    for line in checks(results, full=full):
        print(line)
    out = {"settings": {"n": args.n, "n_test": n_test, "k": args.k, "kronecker_basis": args.kronecker_basis,
                        "batches": args.batches, "cpus": os.cpu_count()},
           "targets": TARGETS, "results": results, "table": text}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
