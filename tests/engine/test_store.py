"""The gradient store: float16/bfloat16 files, resumable writes, the resident store's block
products and top-k, the cached projection, and how far low-precision scores are from float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.grads.projection import ROW_BLOCK, Projector
from engine.group import group_influence
from engine.query.knn import fastif_candidates
from engine.query.topk import naive_topk
from engine.store.gradients import (
    DONE_FILE,
    GRADS_FILE,
    MANIFEST_FILE,
    PARTIAL_GRADS_FILE,
    StoreWriter,
    as_torch,
    open_store,
)
from engine.store.resident import (
    ResidentStore,
    block_product,
    block_product_t,
    scaled_product,
    scaled_product_t,
)

CPU = torch.device("cpu")
TOP = 10


# ---------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_store_round_trips(tmp_path: Path, dtype: str) -> None:
    rows = torch.randn(7, 5, dtype=torch.float64)
    w = StoreWriter(tmp_path, n=7, dim=5, dtype=dtype)
    w.write(slice(0, 7), rows)
    w.finish({})
    array, man = open_store(tmp_path, expect={})
    assert man["dtype"] == dtype
    assert array.dtype == (np.uint16 if dtype == "bfloat16" else np.float16)
    back = as_torch(array, dtype)
    assert back.dtype == getattr(torch, dtype)
    assert torch.equal(back, rows.to(getattr(torch, dtype)))


def test_float16_overflow_is_refused(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, n=2, dim=2, dtype="float16")
    with pytest.raises(engine.RunError, match="bfloat16"):
        w.write(slice(0, 2), torch.full((2, 2), 1e6))


def test_writer_resumes_the_rows_it_has(tmp_path: Path) -> None:
    rows = torch.randn(10, 3, dtype=torch.float64)
    w = StoreWriter(tmp_path, n=10, dim=3, dtype="float64")
    w.write(slice(0, 4), rows[:4])
    w.write(slice(6, 8), rows[6:8])
    w.checkpoint()  # synced and flagged
    w.write(slice(8, 9), rows[8:9])  # written but not yet synced: redone on resume
    del w  # the process dies here: no finish
    assert {p.name for p in tmp_path.iterdir()} == {PARTIAL_GRADS_FILE, DONE_FILE}
    again = StoreWriter(tmp_path, n=10, dim=3, dtype="float64", resume=True)
    assert again.missing().tolist() == [4, 5, 8, 9]
    assert again.missing(slice(5, 9)).tolist() == [5, 8]
    again.write(slice(4, 6), rows[4:6])
    again.write(slice(8, 10), rows[8:10])
    again.finish({})
    assert np.array_equal(np.load(tmp_path / GRADS_FILE), rows.numpy())
    assert {p.name for p in tmp_path.iterdir()} == {GRADS_FILE, MANIFEST_FILE}


def test_writer_without_resume_starts_afresh(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path, n=4, dim=2, dtype="float32")
    w.write(slice(0, 2), torch.ones(2, 2))
    w.checkpoint()
    del w
    assert StoreWriter(tmp_path, n=4, dim=2, dtype="float32").missing().tolist() == [0, 1, 2, 3]
    assert StoreWriter(tmp_path, n=5, dim=2, dtype="float32", resume=True).missing().size == 5


# ---------------------------------------------------------------------------------------------
# resident store: products and top-k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_block_products_match_float64(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    s = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    rows = g.to(dtype)
    exact = rows.double() @ s
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for got in (block_product(rows, s), block_product_t(s.T, rows).T):
        assert got.dtype == (dtype if dtype in (torch.float64, torch.float32) else torch.float32)
        torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-9, 1.0, 1e7])
def test_scaled_products_survive_extreme_query_scales(dtype: torch.dtype, magnitude: float) -> None:
    """The GPU path casts the query to the store dtype; scaled to unit columns first, queries of
    any magnitude survive the cast (a plain float16 cast flushes 1e-9 to zero, 1e7 to inf).
    Runs here on the CPU, where torch has no mm(out_dtype=) and the operands are upcast."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(200, 32, generator=gen).to(dtype)
    s = torch.randn(32, 3, generator=gen, dtype=torch.float64) * magnitude
    s[:, 1] *= 1e-3  # columns of different scales are scaled separately
    exact = rows.double() @ s
    tol = 1e-3 if dtype == torch.float16 else 1e-2
    for got in (scaled_product(rows, s), scaled_product_t(s.T, rows).T):
        assert got.dtype == torch.float32
        for j in range(3):
            torch.testing.assert_close(got[:, j].double(), exact[:, j], rtol=tol,
                                       atol=tol * float(exact[:, j].abs().max()))
    naive = rows.float() @ s.to(dtype).float()
    if dtype == torch.float16 and magnitude != 1.0:
        assert not torch.allclose(naive.double(), exact, rtol=0.1, atol=0.1 * float(exact.abs().max()))


def test_resident_store_stays_in_its_dtype_and_blocks_cover_it() -> None:
    data = torch.randn(1000, 8).to(torch.bfloat16)
    store = ResidentStore(data, compute_dtype=torch.float64)
    assert store.data.dtype == torch.bfloat16 and store.nbytes == 1000 * 8 * 2
    s = torch.randn(8, 2, dtype=torch.float64)
    blocks = list(store.products(s, block=300))
    assert [o for o, _ in blocks] == [0, 300, 600, 900]
    torch.testing.assert_close(torch.cat([b for _, b in blocks]).double(),
                               data.double() @ s, rtol=1e-5, atol=1e-5)
    assert store.rows(slice(3, 5)).dtype == torch.float64


def test_resident_gathers_sums_and_exports_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    data = torch.randn(1000, 8).to(torch.bfloat16)
    store = ResidentStore(data, compute_dtype=torch.float64)
    monkeypatch.setattr(store, "block_rows", lambda m=1: 300)  # several blocks, a short last one
    ids = torch.tensor([999, 3, 3, 450, 0, 777, 301])
    torch.testing.assert_close(store.row_sum(ids), data[ids].double().sum(0), rtol=1e-12, atol=1e-12)
    s = torch.randn(8, 2, dtype=torch.float64)
    torch.testing.assert_close(store.rows_product(ids, s), block_product(data, s)[ids],
                               rtol=1e-6, atol=1e-6)
    host = store.to_numpy(np.float32)
    assert host.dtype == np.float32 and np.array_equal(host, data.float().numpy())


def test_batched_topk_equals_a_full_sort(digits_run: engine.Run) -> None:
    run = digits_run
    idx = np.arange(0, 64)
    scores = torch.from_numpy(run.scores(idx))  # (n, m)
    s = run.solver().solve(run.queries.test_gradients(idx).T.contiguous())
    (hv, hi), (av, ai) = run.queries.topk_scores(s, TOP)
    ref_hv, ref_hi = naive_topk(scores, TOP, largest=False)
    ref_av, ref_ai = naive_topk(scores, TOP, largest=True)
    assert torch.equal(hi, ref_hi) and torch.equal(ai, ref_ai)
    torch.testing.assert_close(hv, ref_hv, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(av, ref_av, rtol=1e-10, atol=1e-14)
    one = run.queries.top_influences(run.queries.test_gradients(idx[5:6]), top=TOP)
    assert one.harmful_ids[:, 0].tolist() == ref_ai[:, 5].tolist()
    assert one.lists(0, run.dataset.y_train)["harmful"][0]["train_id"] == int(ref_ai[0, 5])


# ---------------------------------------------------------------------------------------------
# the projection's cache


def test_cached_projection_equals_the_streamed_one() -> None:
    p, k = 2 * ROW_BLOCK + 77, 12
    g = torch.randn(5, p, dtype=torch.float64)
    streamed = Projector(p, k, seed=4, dtype=torch.float64, device=CPU, cache_bytes=0)
    some = Projector(p, k, seed=4, dtype=torch.float64, device=CPU, cache_bytes=ROW_BLOCK * k * 8)
    whole = Projector(p, k, seed=4, dtype=torch.float64, device=CPU)
    ref = streamed.project(g)
    assert streamed.cached_bytes == 0
    for proj in (some, whole):
        torch.testing.assert_close(proj.project(g), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(proj.project(g), ref, rtol=1e-12, atol=1e-12)  # from the cache
        assert torch.equal(proj.columns(slice(2, 5)), streamed.columns(slice(2, 5)))
    assert some.cached_bytes == ROW_BLOCK * k * 8
    assert whole.cached_bytes == p * k * 8


# ---------------------------------------------------------------------------------------------
# low-precision stores against float32


@pytest.fixture(scope="module")
def projected_f32(tmp_path_factory: pytest.TempPathFactory) -> engine.Run:
    return engine.build("digits", "logreg", tmp_path_factory.mktemp("runs") / "f32", device="cpu",
                        ihvp="projected", project=256, store_dtype="float32", progress=False)


def _as_dtype(run: engine.Run, dtype: str, dst: Path) -> engine.Run:
    """A copy of ``run`` whose store is rewritten in ``dtype`` by the StoreWriter."""
    shutil.copytree(run.path, dst)
    man = json.loads((dst / MANIFEST_FILE).read_text())
    (dst / GRADS_FILE).unlink()
    w = StoreWriter(dst, n=man["n"], dim=man["dim"], dtype=dtype)
    w.write(slice(0, man["n"]), torch.from_numpy(np.load(run.path / GRADS_FILE)))
    w.finish({k: v for k, v in man.items() if k not in ("schema_version", "n", "dim", "dtype")})
    return engine.open_run(dst)


@pytest.mark.parametrize("dtype,min_pearson,max_rel", [("float16", 0.99999, 2e-3),
                                                       ("bfloat16", 0.9999, 2e-2)])
def test_low_precision_scores_agree_with_float32(projected_f32: engine.Run, tmp_path: Path,
                                                 dtype: str, min_pearson: float, max_rel: float) -> None:
    low = _as_dtype(projected_f32, dtype, tmp_path / dtype)
    assert low.store.resident.dtype == getattr(torch, dtype)
    ref, got = projected_f32.scores(), low.scores()  # (n_train, n_test)
    pearson = float(np.corrcoef(ref.ravel(), got.ravel())[0, 1])
    worst, overlap = 0.0, []
    for j in range(ref.shape[1]):
        for order in (np.argsort(ref[:, j])[:TOP], np.argsort(-ref[:, j])[:TOP]):
            worst = max(worst, float(np.max(np.abs(got[order, j] - ref[order, j]) / np.abs(ref[order, j]))))
        overlap.append(len(set(np.argsort(got[:, j])[:TOP]) & set(np.argsort(ref[:, j])[:TOP])) / TOP)
    print(f"\n{dtype}: Pearson {pearson:.8f}, top-{TOP} max rel. error {worst:.2e}, "
          f"helpful top-{TOP} overlap {np.mean(overlap):.4f}")
    assert pearson >= min_pearson
    assert worst <= max_rel


def test_fastif_and_groups_on_a_float16_run(projected_f32: engine.Run, tmp_path: Path) -> None:
    """FastIF and group influence read a half-precision store row by row (no full upcast copy of
    the store is ever made) and agree with the run's own block-product scores."""
    low = _as_dtype(projected_f32, "float16", tmp_path / "f16")
    tests = [0, 5]
    full = low.scores(tests)  # (n_train, 2)
    found = fastif_candidates(low, tests, candidates=50, pool=20)
    for j, (ids, scores) in enumerate(found):
        assert len(ids) > 50
        np.testing.assert_allclose(scores, full[ids, j], rtol=1e-5, atol=1e-6 * np.abs(full).max())
    group = found[0][0][:30]
    res = group_influence(low, group.tolist(), tests)
    np.testing.assert_allclose(res.influence, full[group].sum(axis=0), rtol=1e-5)
    assert low.store.resident.dtype == torch.float16  # scored block by block: no full upcast copy


def test_build_with_a_bfloat16_store(blobs_npz: Path, tmp_path: Path) -> None:
    run = engine.build(str(blobs_npz), "logreg", tmp_path / "bf16", device="cpu", ihvp="projected",
                       project=8, store_dtype="bfloat16", progress=False)
    man = json.loads((run.path / MANIFEST_FILE).read_text())
    assert man["dtype"] == "bfloat16" and np.load(run.path / GRADS_FILE).dtype == np.uint16
    assert run.store.resident.dtype == torch.bfloat16
    ref = engine.build(str(blobs_npz), "logreg", tmp_path / "f64", device="cpu", ihvp="projected",
                       project=8, progress=False)
    want = ref.scores([0, 1])
    np.testing.assert_allclose(run.scores([0, 1]), want, rtol=0, atol=0.02 * np.abs(want).max())


def test_rows_are_flagged_only_after_their_data_is_synced(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Between checkpoints nothing is flagged; a checkpoint syncs the data before the flags."""
    w = StoreWriter(tmp_path, n=6, dim=2, dtype="float32")
    w.write(slice(0, 3), torch.ones(3, 2))
    assert w.missing().tolist() == list(range(6))  # written, not yet checkpointed
    order: list[str] = []
    array_flush, done_flush = w._array.flush, w._done.flush
    monkeypatch.setattr(w._array, "flush", lambda: (order.append("data"), array_flush())[1])
    monkeypatch.setattr(w._done, "flush", lambda: (order.append("flags"), done_flush())[1])
    w.checkpoint()
    assert order == ["data", "flags"]
    assert w.missing().tolist() == [3, 4, 5]
    monkeypatch.setattr("engine.store.gradients.CHECKPOINT_S", 0.0)  # every write checkpoints
    w.write(slice(3, 6), torch.ones(3, 2))
    assert w.missing().size == 0


def test_an_out_of_memory_error_keeps_the_tensor_core_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """mm(out_dtype=float32) failing because the op is missing switches to the upcast product for
    good; failing for memory (a RuntimeError subclass too) is raised and switches nothing."""
    from engine.store import resident

    monkeypatch.setattr(resident, "_MM_OUT_DTYPE", {})
    a, b = torch.randn(4, 3).half(), torch.randn(3, 2).half()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(resident.torch, "mm", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        resident._mm_float32(a, b)
    assert resident._MM_OUT_DTYPE == {}

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::mm.dtype'")

    monkeypatch.setattr(resident.torch, "mm", missing)
    got = resident._mm_float32(a, b)
    assert resident._MM_OUT_DTYPE == {"cpu": False} and got.dtype == torch.float32
    torch.testing.assert_close(got, a.float() @ b.float())
