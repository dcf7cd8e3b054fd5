"""How fast the built-in networks train, against plain PyTorch on the same module, in one process.

For each case (model:n), the data set's first n training images (a seeded stratified subset):

- ``ours``: :func:`engine.models.train.train_network` with the default :class:`TrainConfig`
  (or --epochs / --max-samples / --polish-s), the whole training as a build runs it: its
  images/s over the epochs (epochs × n / the epochs' wall time), the epochs it chose, its wall
  time with the polish, ‖∇R(θ̂)‖ and the test accuracy.
- ``plain``: the same architecture (a fresh module of the same seed) trained by a textbook loop,
  ``torch.optim.Adam(model.parameters(), lr, weight_decay=λ)``, ``F.cross_entropy(model(x_b),
  y_b).backward()``, ``opt.step()``, at the same batch size, for one epoch before and one after
  ours, at the training thread count; and the first 1,024 images at PyTorch's default thread
  count (what training used before it capped its threads).

The machine is shared: rates are given per wall second and per CPU second of this process
(``time.process_time``), and the load average is noted. Prints a table and writes JSON
(default bench/results/train_speed.json).

    python bench/train_speed.py --data /tmp/fm32rgb.npz --cases cnn:5000
    python bench/train_speed.py --data fashion-mnist --cases resnet:10000 --test-size 10000
    python bench/train_speed.py --data digits --cases mlp:1000 cnn:1000 --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import ModelKind, TrainConfig
from engine.data import load_data
from engine.models.losses import make_loss
from engine.models.objective import Objective
from engine.models.threads import intra_op_threads
from engine.models.train import stopping_rule, train_network
from engine.models.zoo import build_model

RESULTS = ROOT / "bench" / "results" / "train_speed.json"
WEIGHT_DECAY = 1e-2  # BuildConfig's default λ
DEFAULT_THREADS_IMAGES = 1024  # images of the plain epoch at PyTorch's default thread count


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def plain_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                batch: int, gen: torch.Generator) -> tuple[float, float]:
    """One epoch of the textbook loop: (wall s, CPU s)."""
    t, c = time.perf_counter(), time.process_time()
    model.train()
    order = torch.randperm(len(x), generator=gen)  # (n,)
    for start in range(0, len(x), batch):
        idx = order[start : start + batch]  # (b,)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t, time.process_time() - c


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    with torch.no_grad():
        right = sum(int((model(x[s : s + chunk]).argmax(1) == y[s : s + chunk]).sum())
                    for s in range(0, len(x), chunk))
    return right / max(len(x), 1)


def run_case(kind: ModelKind, n: int, *, data: str, test_size: int, config: TrainConfig,
             seed: int, weight_decay: float = WEIGHT_DECAY) -> dict[str, Any]:
    ds = load_data(data, seed=seed, train_size=n, test_size=test_size)
    x = torch.from_numpy(np.asarray(ds.x_train, dtype=np.float32))  # (n, *shape)
    y = torch.from_numpy(np.asarray(ds.y_train)).long()  # (n,)
    xt = torch.from_numpy(np.asarray(ds.x_test, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(ds.y_test)).long()
    n = len(x)

    def fresh() -> torch.nn.Module:
        return build_model(kind, input_shape=ds.input_shape, n_classes=ds.n_classes, train=config, seed=seed)

    gen = torch.Generator().manual_seed(seed)
    default_threads = torch.get_num_threads()
    plain = fresh()
    opt = torch.optim.Adam(plain.parameters(), lr=config.lr, weight_decay=weight_decay)
    head = slice(0, min(n, DEFAULT_THREADS_IMAGES))  # PyTorch's default threads: slow on a loaded machine
    plain_default = plain_epoch(plain, opt, x[head], y[head], batch=config.batch_size, gen=gen)
    with intra_op_threads(config.threads) as threads:
        plain_runs = [plain_epoch(plain, opt, x, y, batch=config.batch_size, gen=gen)]
    obj = Objective(fresh(), make_loss(kind.value, svm_temperature=0.01), device=torch.device("cpu"),
                    dtype=torch.float32)
    t, c = time.perf_counter(), time.process_time()
    res = train_network(obj, x, y, weight_decay=weight_decay, config=config, seed=seed)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    with intra_op_threads(config.threads):
        plain_runs.append(plain_epoch(plain, opt, x, y, batch=config.batch_size, gen=gen))
    obj.load_flat(res.theta)
    epochs = res.iterations["epochs"]
    epochs_s = res.iterations["epochs_s"]
    plain_wall = float(np.mean([w for w, _ in plain_runs]))
    plain_cpu = float(np.mean([c_ for _, c_ in plain_runs]))
    return {
        "model": kind.value, "n": n, "weight_decay": weight_decay, "n_params": obj.n_params, "input_shape": list(ds.input_shape),
        "batch_size": config.batch_size, "threads": threads, "default_threads": default_threads,
        "epochs": epochs, "stopping": stopping_rule(config, n),
        "ours_img_s": epochs * n / epochs_s, "plain_img_s": n / plain_wall,
        "plain_default_threads_img_s": head.stop / plain_default[0],
        "ours_cpu_img_s": epochs * n / res.iterations["epochs_cpu_s"],
        "plain_cpu_img_s": n / plain_cpu, "plain_default_threads_cpu_img_s": head.stop / plain_default[1],
        "epochs_s": epochs_s, "wall_s": wall, "cpu_s": cpu, "lbfgs_evals": res.iterations["lbfgs_evals"],
        "grad_norm": res.grad_norm, "objective": res.objective,
        "train_accuracy": accuracy(obj.model, x, y), "test_accuracy": accuracy(obj.model, xt, yt),
        "n_test": len(xt), "epoch_losses": res.iterations["epoch_losses"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':<7}{'n':>7}{'params':>9}{'thr':>4}{'ours img/s':>11}{'plain img/s':>12}"
            f"{'plain@dflt':>11}{'epochs':>7}{'wall s':>8}{'|gradR|':>9}{'test acc':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['model']:<7}{r['n']:>7,}{r['n_params']:>9,}{r['threads']:>4}{r['ours_img_s']:>11,.0f}"
                   f"{r['plain_img_s']:>12,.0f}{r['plain_default_threads_img_s']:>11,.0f}{r['epochs']:>7}"
                   f"{r['wall_s']:>8.1f}{r['grad_norm']:>9.2e}{r['test_accuracy']:>9.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="a data set spec of engine.data.load_data")
    ap.add_argument("--cases", nargs="+", default=["cnn:5000"], help="model:n (cnn, mlp, resnet)")
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=None, help="TrainConfig.epochs (default: its default)")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--polish-s", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="TrainConfig.threads (0: auto)")
    ap.add_argument("--width", type=int, default=None, help="resnet width")
    ap.add_argument("--quick", action="store_true", help="2 epochs, no polish (a smoke run)")
    ap.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="λ of R (the build's default 1e-2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_samples", args.max_samples),
                                   ("polish_s", args.polish_s), ("threads", args.threads),
                                   ("width", args.width)) if v is not None}
    if args.quick:
        overrides.update(epochs=2, polish_s=0.0)
    config = dataclasses.replace(TrainConfig(), **overrides)
    rows = []
    for case in args.cases:
        name, _, size = case.partition(":")
        load = loadavg()
        row = run_case(ModelKind(name), int(size or 5000), data=args.data, test_size=args.test_size,
                       config=config, seed=args.seed, weight_decay=args.weight_decay)
        row["load_before"], row["load_after"] = load, loadavg()
        rows.append(row)
        print(table([row]).splitlines()[-1], file=sys.stderr)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": args.data, "config": dataclasses.asdict(config),
                                    "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
