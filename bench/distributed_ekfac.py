"""A distributed EK-FAC build against a one-process one, with a plain forward + backward of the
same model beside it.

Two gloo processes under ``torchrun`` (one thread each) and one process build the built-in cnn
on ``--n`` Fashion-MNIST images with ``--ihvp ekfac`` and ``--epochs``; per build the stage
timings from ``run.json`` and the peak RSS of its processes; then a plain forward + backward of
the trained cnn over the same images, batch ``--batch``, one thread (images/s). Needs Debian's
``dataset-fashion-mnist``.

    .venv/bin/python bench/distributed_ekfac.py      # -> bench/results/distributed_ekfac.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "distributed_ekfac.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(out: Path, *, processes: int, args: argparse.Namespace) -> dict:
    """One build (``processes`` > 1: under torchrun); its timings, wall time and peak RSS."""
    options = ["build", "--data", "fashion-mnist", "--train-size", str(args.n), "--test-size", "100",
               "--model", "cnn", "--ihvp", "ekfac", "--epochs", str(args.epochs), "--device", "cpu", "--quiet",
               "--out", str(out)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
               str(processes), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "app.cli", *options, "--distributed"]
    else:
        cmd = [sys.executable, "-m", "app.cli", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    timings = json.loads((out / "run.json").read_text())["timings"]
    return {"processes": processes, "wall_s": wall, "peak_rss_bytes_max_child": peak, "timings": timings}


def plain_rate(run_path: Path, *, batch: int) -> float:
    """Images/s of a plain forward + backward of the run's model over its training images."""
    import torch

    import engine

    torch.set_num_threads(1)
    run = engine.open_run(run_path)
    model = run.model.objective.model
    x, y = run.data.x_train.to(torch.float32), run.data.y_train
    model.train()
    t = time.perf_counter()
    for start in range(0, len(x), batch):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[start : start + batch]), y[start : start + batch]).backward()
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            rows.append(build(Path(tmp) / f"run{processes}", processes=processes, args=args))
        rate = plain_rate(Path(tmp) / "run2", batch=args.batch)
    print(f"{'processes':>9}  {'wall s':>7}  {'gradients s':>11}  {'curvature s':>11}  {'train s':>7}  "
          f"{'peak RSS (largest process)':>26}")
    for r in rows:
        t = r["timings"]
        print(f"{r['processes']:>9}  {r['wall_s']:>7.1f}  {t['gradients_s']:>11.2f}  {t['curvature_s']:>11.2f}  "
              f"{t['train_s']:>7.1f}  {r['peak_rss_bytes_max_child'] / 1e9:>24.2f} GB")
    print(f"plain forward + backward of the same cnn, batch {args.batch}, one thread: {rate:.0f} images/s "
          f"(the store pass's rate: {args.n / rows[0]['timings']['gradients_s']:.0f} images/s in one process)")
    load = os.getloadavg()
    print(f"load average {load}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"case": vars(args) | {"json": str(args.json), "load_average": load},
                                     "rows": rows, "plain_images_per_s": rate}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
