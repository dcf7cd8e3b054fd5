"""The distributed build: two gloo processes under torchrun write the same store and give the same
scores as one process; per-shard top-k merge to the unsharded top-k."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.build import partial_folder
from engine.distributed import LocalComm, reduced_hvp, shard_rows
from engine.query.topk import RunningTopK, merge_topk, naive_topk
from engine.runinfo import CURVATURE_FILE
from engine.store.files import load_tensors
from engine.store.gradients import GRADS_FILE, StoreWriter, as_torch
from engine.store_stage import write_store

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], *, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc <args>`` on 127.0.0.1 with a free port (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "influence: error" in line]
    assert done.returncode == 0, "\n".join(errors) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _store(path: Path) -> np.ndarray:
    man = json.loads((path / "manifest.json").read_text())
    return as_torch(np.load(path / GRADS_FILE), man["dtype"]).double().numpy()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["exact", "projected"])
def test_two_gloo_processes_build_the_one_process_run(kind: str, tmp_path: Path) -> None:
    opts = (["--ihvp", "projected", "--project", "48", "--store-dtype", "float32"]
            if kind == "projected" else [])
    out = tmp_path / "dist"
    if kind == "exact":  # through the influence CLI
        torchrun(["-m", "app.cli", "build", "--distributed", "--data", "digits", "--model", "logreg",
                  "--out", str(out), "--device", "cpu", "--chunk-size", "100", "--quiet", *opts])
    else:  # through python -m engine.distributed
        torchrun(["-m", "engine.distributed", "--data", "digits", "--model", "logreg",
                  "--out", str(out), "--device", "cpu", "--chunk-size", "100", *opts])
    kw = {"ihvp": "projected", "project": 48, "store_dtype": "float32"} if kind == "projected" else {}
    ref = engine.build("digits", "logreg", tmp_path / "one", device="cpu", progress=False, **kw)
    dist_run = engine.open_run(out)
    assert json.loads((out / "run.json").read_text())["processes"] == 2
    assert not list(tmp_path.glob(".*partial"))
    diff = np.abs(_store(out) - _store(ref.path)).max()
    print(f"\n{kind}: 2-process store max abs difference {diff:.3g}")
    assert diff <= 1e-6, diff
    np.testing.assert_allclose(dist_run.scores(), ref.scores(), rtol=1e-6, atol=1e-12)


def test_shards_cover_the_rows_contiguously() -> None:
    for n, world in [(10, 3), (1797, 2), (5, 5), (7, 1)]:
        parts = [shard_rows(n, r, world) for r in range(world)]
        assert parts[0].start == 0 and parts[-1].stop == n
        assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_reduced_hvp_in_one_process_is_the_local_hvp_plus_shift() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    hvp = reduced_hvp(lambda x: a @ x, weight=1.0, shift=0.5, comm=LocalComm())
    torch.testing.assert_close(hvp(v), a @ v + 0.5 * v, rtol=0, atol=0)


@pytest.mark.parametrize("largest", [True, False])
def test_merged_shard_topk_equals_the_unsharded_topk(largest: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 7, generator=gen, dtype=torch.float64)  # (n, m), no ties
    k = 12
    parts = []
    for r in range(3):  # three shards, each streamed in blocks of 50 rows
        rows = shard_rows(1000, r, 3)
        acc = RunningTopK(k, largest=largest)
        for start in range(rows.start, rows.stop, 50):
            acc.update(start, scores[start : min(start + 50, rows.stop)])
        parts.append(acc.result())
    values, ids = merge_topk(parts, k, largest=largest)
    ref_v, ref_i = naive_topk(scores, k, largest=largest)
    assert torch.equal(ids, ref_i)
    assert torch.equal(values, ref_v)


class _ThreadComm(LocalComm):
    """Rank ``rank`` of ``world`` threads in this process; a rank other than 0 is slow to leave
    each barrier, so rank 0 runs ahead of it the way a loaded machine lets it."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier) -> None:
        self.rank, self.world, self._barrier = rank, world, barrier

    def barrier(self) -> None:
        self._barrier.wait(timeout=30)
        if self.rank:
            time.sleep(0.3)


class _RowSpace:
    """The part of a GradientSpace the store pass uses: row i is (i, i, i) from x = arange."""

    dim = 3
    objective = None

    def rows(self, x: torch.Tensor, y: torch.Tensor, *, chunk: int, sink, progress, on_captures) -> None:
        for start in range(0, len(x), chunk):
            block = x[start : start + chunk, None].expand(-1, self.dim).double()
            sink(slice(start, start + len(block)), block)
            progress(len(block))


def test_rank_zero_finishes_the_store_only_after_every_rank_flagged_its_rows(tmp_path: Path) -> None:
    # rank 1 used to flag its rows done only after the last barrier: rank 0, counting them
    # straight after it, found them missing ("gradient store incomplete") whenever it ran ahead
    n, world = 40, 2
    x, y = torch.arange(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    barrier, errors = threading.Barrier(world), []

    def rank(r: int) -> None:
        mine = shard_rows(n, r, world)
        try:
            write_store(tmp_path, _RowSpace(), x[mine], y[mine], mine=mine, n=n, store_dtype="float32",
                        chunk=7, threads=1, comm=_ThreadComm(r, world, barrier), progress=False,
                        extra={}, covariances=False, row_sum=False, resident=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    rows = np.load(tmp_path / GRADS_FILE)
    np.testing.assert_array_equal(rows, np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1))
    assert (tmp_path / "manifest.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("projection", [[], ["--projection", "kronecker", "--project", "40"]],
                         ids=["full", "kronecker"])
def test_two_gloo_processes_fit_ekfac_from_their_own_rows(projection: list[str], tmp_path: Path) -> None:
    # each rank accumulates the covariances of its rows in its store pass and Λ from its rows,
    # summed over the ranks: the factors and scores of one process, without rank 0's passes over
    # all the data
    opts = ["--data", "digits", "--model", "cnn", "--ihvp", "ekfac", "--dtype", "float64", "--epochs", "3",
            "--train-size", "300", "--test-size", "20", "--device", "cpu", "--chunk-size", "64", *projection]
    out = tmp_path / "dist"
    done = torchrun(["-m", "app.cli", "build", "--distributed", "--out", str(out), *opts])
    assert "ekfac covariances" not in done.stderr  # no capture pass over the data on rank 0
    kw = {"projection": "kronecker", "project": 40} if projection else {}
    ref = engine.build("digits", "cnn", tmp_path / "one", device="cpu", progress=False, ihvp="ekfac",
                       dtype="float64", train=engine.TrainConfig(epochs=3), train_size=300, test_size=20,
                       chunk_size=64, **kw)
    got, want = load_tensors(out / CURVATURE_FILE), load_tensors(ref.path / CURVATURE_FILE)
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith("eigenvectors"):  # up to each eigenvector's sign: compare Q diag(σ) Qᵀ
            vals = key.replace("eigenvectors", "eigenvalues")
            torch.testing.assert_close(got[key] @ torch.diag(got[vals]) @ got[key].T,
                                       want[key] @ torch.diag(want[vals]) @ want[key].T, rtol=1e-8, atol=1e-12)
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-8, atol=1e-12, msg=key)
    np.testing.assert_allclose(engine.open_run(out).scores([0, 1, 2]), ref.scores([0, 1, 2]), rtol=1e-6,
                               atol=1e-10)


_STOP_BEFORE_STORE = """
import os, sys
import engine
def stop(*args, **kwargs):
    os._exit(0)  # killed once θ̂ is trained and recorded: the partial folder stays
sys.modules["engine.build"].write_store = stop
engine.build("digits", "cnn", sys.argv[1], device="cpu", progress=False, ihvp="ekfac", dtype="float64",
             train=engine.TrainConfig(epochs=3), train_size=300, test_size=20, chunk_size=64)
"""


@pytest.mark.slow
def test_a_resumed_distributed_ekfac_build_where_only_rank_0_wrote_all_its_rows(tmp_path: Path) -> None:
    # a killed run left rows of rank 1's shard written and none of rank 0's: rank 0's store pass
    # now sees all its own rows, rank 1's not, so the factors come from all the data on rank 0
    # (not from rank 0's half, as they once did)
    ref = engine.build("digits", "cnn", tmp_path / "one", device="cpu", progress=False, ihvp="ekfac",
                       dtype="float64", train=engine.TrainConfig(epochs=3), train_size=300, test_size=20,
                       chunk_size=64)
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _STOP_BEFORE_STORE, str(out)], cwd=ROOT, env=env, check=True,
                   timeout=300)
    partial = partial_folder(out)
    assert (partial / "build-state.json").is_file() and not (partial / GRADS_FILE).exists()
    rows = np.load(ref.path / GRADS_FILE)  # (n, dim) float64: the rows every build computes
    n, dim = rows.shape
    writer = StoreWriter(partial, n=n, dim=dim, dtype="float64", resume=True)
    written = slice(n // 2 + 10, n)  # inside rank 1's shard [n/2, n)
    writer.write(written, torch.from_numpy(rows[written]))
    writer.close()
    torchrun(["-m", "app.cli", "build", "--distributed", "--resume", "--data", "digits", "--model", "cnn",
              "--ihvp", "ekfac", "--dtype", "float64", "--epochs", "3", "--train-size", "300", "--test-size",
              "20", "--device", "cpu", "--chunk-size", "64", "--out", str(out), "--quiet"])
    got, want = load_tensors(out / CURVATURE_FILE), load_tensors(ref.path / CURVATURE_FILE)
    for key in want:
        if key.endswith("eigenvectors"):
            vals = key.replace("eigenvectors", "eigenvalues")
            torch.testing.assert_close(got[key] @ torch.diag(got[vals]) @ got[key].T,
                                       want[key] @ torch.diag(want[vals]) @ want[key].T, rtol=1e-8, atol=1e-12)
        else:
            torch.testing.assert_close(got[key], want[key], rtol=1e-8, atol=1e-12, msg=key)
