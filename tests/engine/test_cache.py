"""The engine's shared caches (engine.cache): bounded by bytes, keyed, locked per key, and the
facade's parts behind them (typed run metadata, solver reports returned from the solve)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.cache import BoundedCache, nbytes_of
from engine.query.knn import fastif_top_influences
from engine.runinfo import read_run_info
from tests.threads import run_in_threads


def _array(kib: int) -> np.ndarray:
    return np.zeros(kib * 128)  # kib KiB of float64


def test_the_budget_bounds_the_bytes_kept_least_recently_used_first() -> None:
    cache = BoundedCache(budget_bytes=10 << 10)  # 10 KiB
    for k in range(4):
        cache.get(k, lambda: _array(3))
    assert len(cache) == 3 and cache.nbytes == 9 << 10  # the fourth pushed the first out
    assert 0 not in cache and cache.evicted == 1
    cache.get(1, lambda: pytest.fail("a hit must not recompute"))  # 1 becomes most recent
    cache.get(9, lambda: _array(3))
    assert 2 not in cache and 1 in cache  # the least recently used went, not the oldest insert
    big = cache.get("big", lambda: _array(20))  # larger than the budget: returned, not kept
    assert big.nbytes == 20 << 10 and "big" not in cache and cache.nbytes <= 10 << 10
    assert not big.flags.writeable  # cached arrays are read-only, kept or not


def test_nbytes_counts_tensors_arrays_and_tuples() -> None:
    import torch

    assert nbytes_of((np.zeros(4), torch.zeros(3, dtype=torch.float32))) == 32 + 12
    assert nbytes_of("not an array") == 0


def test_sixteen_threads_compute_a_missing_key_once_and_other_keys_concurrently() -> None:
    cache = BoundedCache()
    calls: dict[str, int] = {"a": 0, "b": 0}
    both_running = threading.Barrier(2, timeout=10)
    lock = threading.Lock()

    def compute(key: str) -> np.ndarray:
        with lock:
            calls[key] += 1
        both_running.wait()  # a's and b's computations overlap: no global lock is held
        time.sleep(0.05)
        return np.full(3, ord(key))

    got: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        key = "a" if i % 2 == 0 else "b"
        got[i] = cache.get(key, lambda: compute(key))

    assert run_in_threads(worker, 16) == []
    assert calls == {"a": 1, "b": 1} and cache.computed == 2
    assert all(got[i][0] == (ord("a") if i % 2 == 0 else ord("b")) for i in range(16))


def test_a_failed_computation_is_not_cached() -> None:
    cache = BoundedCache()
    with pytest.raises(ValueError):
        cache.get("k", lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert cache.get("k", lambda: np.ones(2)).sum() == 2


def test_distinct_pool_values_stay_within_the_run_budget(blobs_npz: Path, blobs_run: engine.Run) -> None:
    """The FastIF pool (a request parameter) used to keep a copy of store rows per distinct value
    forever; now every pool shares the run's byte budget."""
    budget = 64 << 10
    run = engine.open_run(blobs_run.path, cache_bytes=budget)
    row_bytes = run.store.resident.data[0].numel() * run.store.resident.data.element_size()
    for pool in range(1, 120):
        fastif_top_influences(run, 0, top=3, candidates=5, pool=pool)
        assert run.cache.nbytes <= budget
    assert run.cache.evicted > 0  # the pools did not all fit: old ones went
    assert sum(range(1, 120)) * row_bytes > budget  # unbounded, they would have passed it
    want = fastif_top_influences(blobs_run, 0, top=3, candidates=5, pool=40)[0]
    assert fastif_top_influences(run, 0, top=3, candidates=5, pool=40)[0]["helpful"] == want["helpful"]


def test_run_info_is_typed_and_knows_convexity(blobs_run: engine.Run) -> None:
    info = read_run_info(blobs_run.path)
    assert info.model.kind is engine.ModelKind.LOGREG and info.model.convex
    assert info.data.n_train == blobs_run.n_train and info.config == blobs_run.config
    assert not engine.ModelKind.MLP.convex and engine.ModelKind.SVM.convex


def test_malformed_run_json_is_a_run_error(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"schema_version": 1, "config": {}}')
    with pytest.raises(engine.RunError, match="malformed"):
        engine.open_run(tmp_path)


@pytest.mark.parametrize("method", ["cg", "lissa"])
def test_each_query_reports_its_own_solve(blobs_run: engine.Run, method: str) -> None:
    """Concurrent explains report the diagnostics of their own solve, equal to a serial one."""
    serial = {i: blobs_run.explain(i, top=3, ihvp=method)["ihvp"]["diagnostics"] for i in range(6)}
    got: dict[int, dict] = {}

    def worker(i: int) -> None:
        got[i] = blobs_run.explain(i, top=3, ihvp=method)["ihvp"]["diagnostics"]

    assert run_in_threads(worker, 6) == []
    assert got == serial


def test_the_engine_imports_only_public_names_across_modules() -> None:
    """No ``from .x import _private`` between engine modules (a private name stays in its module)."""
    import re

    root = Path(engine.__file__).parent
    bad = [f"{p.relative_to(root)}: {line.strip()}" for p in root.rglob("*.py")
           for line in p.read_text(encoding="utf-8").splitlines()
           if re.match(r"\s*from \.+[\w.]* import .*\b_[a-z]", line)]
    assert bad == []
