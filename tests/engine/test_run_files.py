"""Tests for the files of a run: staleness and corruption checks on open, atomic builds, the
gradient store's writer and manifest, and the engine's import footprint."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from app.cli import main
from engine.store.gradients import DONE_FILE, GRADS_FILE, MANIFEST_FILE, StoreWriter, open_store
from tests.small_data import N_PARAMS, N_TRAIN, write_npz

build_module = importlib.import_module("engine.build")  # `engine.build` is the function

RUN_FILES = {"run.json", "grads.npy", "manifest.json", "model.pt", "curvature.pt"}




def build_small(npz: Path, out: Path, **kw) -> engine.Run:
    return engine.build(str(npz), "logreg", out, weight_decay=1e-2, device="cpu", progress=False,
                        **kw)


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "small.npz")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, npz: Path) -> Path:
    """A pristine run; tests copy it before damaging it."""
    out = tmp_path_factory.mktemp("runs") / "base"
    build_small(npz, out)
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".building-" in p.name or ".tmp" in p.name)


# ---------------------------------------------------------------------------------------------
# stale runs


def test_pristine_copy_opens(run_copy):
    run = engine.open_run(run_copy)
    assert run.n_train == N_TRAIN and run.store.resident.data.shape == (N_TRAIN, N_PARAMS)


def test_changed_npz_makes_the_run_stale(tmp_path, capsys):
    data = write_npz(tmp_path / "mine.npz")
    out = tmp_path / "run"
    build_small(data, out)
    engine.open_run(out)  # fine before the change

    with np.load(data) as archive:
        arrays = {k: archive[k].copy() for k in archive.files}
    arrays["X_train"][17, 3] += 0.25  # one value
    np.savez(data, **arrays)

    with pytest.raises(engine.StaleRunError, match="data .* changed"):
        engine.open_run(out)

    f = tmp_path / "s.npy"
    rc = main(["scores", "--run", str(out), "--out", str(f)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("influence: error: ") and len(err.splitlines()) == 1
    assert "changed" in err
    assert not f.exists()


def test_replaced_model_weights_make_the_run_stale(run_copy):
    tensors = torch.load(run_copy / "model.pt", weights_only=True)
    tensors["theta"] = tensors["theta"] + 1e-3  # same shape, different θ
    torch.save(tensors, run_copy / "model.pt")
    with pytest.raises(engine.StaleRunError, match="model weights changed"):
        engine.open_run(run_copy)


def test_model_with_wrong_parameter_count_is_stale(run_copy):
    torch.save({"theta": torch.zeros(N_PARAMS + 1, dtype=torch.float64)}, run_copy / "model.pt")
    with pytest.raises(engine.StaleRunError, match="parameter count"):
        engine.open_run(run_copy)


def test_manifest_fingerprint_mismatch_is_stale(run_copy):
    man = json.loads((run_copy / MANIFEST_FILE).read_text())
    man["model_fingerprint"] = "0" * 64
    (run_copy / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(engine.StaleRunError, match="model_fingerprint"):
        engine.open_run(run_copy)


# ---------------------------------------------------------------------------------------------
# damaged or missing files → RunError, never a raw numpy / OS error


def _truncate(p: Path) -> None:
    b = (p / GRADS_FILE).read_bytes()
    (p / GRADS_FILE).write_bytes(b[: len(b) // 2])


def _truncate_header(p: Path) -> None:
    (p / GRADS_FILE).write_bytes((p / GRADS_FILE).read_bytes()[:40])


def _garbage(p: Path) -> None:
    (p / GRADS_FILE).write_bytes(np.random.default_rng(1).bytes(4096))


def _wrong_shape(p: Path) -> None:
    np.save(p / GRADS_FILE, np.zeros((N_TRAIN - 1, N_PARAMS)))


def _wrong_dtype(p: Path) -> None:
    np.save(p / GRADS_FILE, np.zeros((N_TRAIN, N_PARAMS), dtype=np.float32))


@pytest.mark.parametrize("damage", [_truncate, _truncate_header, _garbage, _wrong_shape, _wrong_dtype],
                         ids=["truncated", "truncated-header", "garbage", "wrong-shape", "wrong-dtype"])
def test_damaged_grads_raise_run_error(run_copy, damage):
    damage(run_copy)
    with pytest.raises(engine.RunError, match="grads.npy") as info:
        engine.open_run(run_copy)
    assert not isinstance(info.value, engine.StaleRunError)


def test_missing_manifest_raises_run_error(run_copy):
    (run_copy / MANIFEST_FILE).unlink()
    with pytest.raises(engine.RunError, match="manifest.json"):
        engine.open_run(run_copy)


def test_missing_grads_raises_run_error(run_copy):
    (run_copy / GRADS_FILE).unlink()
    with pytest.raises(engine.RunError, match="gradient store"):
        engine.open_run(run_copy)


def test_missing_run_json_is_not_a_run(run_copy):
    (run_copy / "run.json").unlink()
    with pytest.raises(engine.RunError, match="not a run folder"):
        engine.open_run(run_copy)


def test_missing_model_raises_run_error(run_copy):
    (run_copy / "model.pt").unlink()
    with pytest.raises(engine.RunError, match="model.pt"):
        engine.open_run(run_copy)


def test_unknown_run_schema_raises_run_error(run_copy):
    info = json.loads((run_copy / "run.json").read_text())
    info["schema_version"] = 999
    (run_copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(engine.RunError, match="schema"):
        engine.open_run(run_copy)


def _empty_grads(p: Path) -> None:
    (p / GRADS_FILE).write_bytes(b"")


def _bad_json(name: str):
    def damage(p: Path) -> None:
        (p / name).write_text("{not json")
    return damage


def _garbage_pt(name: str):
    def damage(p: Path) -> None:
        (p / name).write_bytes(b"garbage" * 20)
    return damage


@pytest.mark.parametrize("damage", [
    _empty_grads, _bad_json("manifest.json"), _bad_json("run.json"),
    _garbage_pt("model.pt"), _garbage_pt("curvature.pt"),
], ids=["empty-grads", "manifest-not-json", "run-json-not-json", "model-garbage", "curvature-garbage"])
def test_corrupt_files_raise_run_error(run_copy, damage, request):
    damage(run_copy)
    name = {"empty-grads": "grads.npy", "manifest-not-json": "manifest.json",
            "run-json-not-json": "run.json", "model-garbage": "model.pt",
            "curvature-garbage": "curvature.pt"}[request.node.callspec.id]
    with pytest.raises(engine.RunError, match=name.replace(".", r"\.")):  # names the file
        engine.open_run(run_copy)


def test_missing_curvature_raises_run_error(run_copy):
    """An exact run without its Hessian is refused, not silently recomputed."""
    (run_copy / "curvature.pt").unlink()
    with pytest.raises(engine.RunError, match=r"curvature\.pt"):
        engine.open_run(run_copy)


# ---------------------------------------------------------------------------------------------
# atomic builds


class Boom(RuntimeError):
    pass


def test_build_failing_midway_leaves_nothing(npz, tmp_path, monkeypatch):
    real_write = StoreWriter.write
    calls = []

    def write_then_fail(self, rows, block):
        calls.append(rows)
        if len(calls) == 2:
            raise Boom("disk on fire")
        real_write(self, rows, block)

    monkeypatch.setattr(StoreWriter, "write", write_then_fail)
    out = tmp_path / "run"
    with pytest.raises(Boom):
        build_small(npz, out, chunk_size=16)
    assert len(calls) == 2  # the first block really was written
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_build_interrupted_at_curvature_leaves_nothing(npz, tmp_path, monkeypatch):
    """KeyboardInterrupt after the store is complete still removes the temporary folder."""
    def interrupt(*args, **kwargs):
        assert any((p / GRADS_FILE).exists() for p in tmp_path.iterdir())  # store was finished
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "data_hessian", interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        build_small(npz, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_rebuild_keeps_the_old_run(npz, tmp_path, monkeypatch):
    out = tmp_path / "run"
    build_small(npz, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise Boom("fail")

    monkeypatch.setattr(build_module, "_build_into", fail)
    with pytest.raises(Boom):
        build_small(npz, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    engine.open_run(out)


def test_build_writes_exactly_the_run_files(base_run):
    assert {p.name for p in base_run.iterdir()} == RUN_FILES
    assert leftovers(base_run.parent) == []


# ---------------------------------------------------------------------------------------------
# the store writer and manifest


def test_store_writer_refuses_missing_rows(tmp_path):
    w = StoreWriter(tmp_path, n=5, dim=3, dtype="float64")
    w.write(slice(0, 3), torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(engine.RunError, match="2 rows missing"):
        w.finish({})
    assert not (tmp_path / GRADS_FILE).exists()
    assert not (tmp_path / MANIFEST_FILE).exists()
    assert {p.name for p in tmp_path.iterdir()} <= {GRADS_FILE + ".tmp", DONE_FILE}
    with pytest.raises(engine.RunError):
        open_store(tmp_path, expect={})


def test_store_writer_accepts_blocks_in_any_order(tmp_path):
    w = StoreWriter(tmp_path, n=5, dim=3, dtype="float32")
    rows = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    w.write(slice(3, 5), rows[3:])
    w.write(slice(0, 3), rows[:3])
    manifest = w.finish({"data_fingerprint": "d", "model_fingerprint": "m", "projection": None})
    assert {p.name for p in tmp_path.iterdir()} == {GRADS_FILE, MANIFEST_FILE}
    array, on_disk = open_store(tmp_path, expect={"data_fingerprint": "d"})
    assert array.dtype == np.float32
    assert np.array_equal(array, rows.numpy().astype(np.float32))
    assert on_disk == manifest
    with pytest.raises(engine.StaleRunError):
        open_store(tmp_path, expect={"data_fingerprint": "other"})


def test_store_writer_refuses_unknown_dtype(tmp_path):
    with pytest.raises(engine.RunError, match="dtype"):
        StoreWriter(tmp_path, n=2, dim=2, dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_manifest_records_the_store(base_run):
    man = json.loads((base_run / MANIFEST_FILE).read_text())
    info = json.loads((base_run / "run.json").read_text())
    assert man["schema_version"] == 1
    assert (man["n"], man["dim"], man["dtype"]) == (N_TRAIN, N_PARAMS, "float64")
    assert man["data_fingerprint"] == info["data"]["fingerprint"]
    assert man["model_fingerprint"] == info["model"]["fingerprint"]
    assert len(man["data_fingerprint"]) >= 16 and len(man["model_fingerprint"]) == 64
    assert man["projection"] is None
    grads = np.load(base_run / GRADS_FILE)
    assert grads.shape == (man["n"], man["dim"]) and grads.dtype == np.float64


def test_manifest_records_the_projection(npz, tmp_path):
    run = build_small(npz, tmp_path / "proj", ihvp="projected", project=5, seed=3)
    man = json.loads((run.path / MANIFEST_FILE).read_text())
    assert man["projection"] == {"kind": "dense", "k": 5, "seed": 3}
    assert (man["n"], man["dim"]) == (N_TRAIN, 5)
    assert run.scores([0]).shape == (N_TRAIN, 1)


# ---------------------------------------------------------------------------------------------
# import footprint


def test_import_engine_does_not_import_the_web_stack():
    code = ("import sys, json, engine\n"
            "web = ['fastapi', 'jinja2', 'plotly', 'pydantic', 'starlette', 'uvicorn']\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in web)))\n"
            "print('engine' in sys.modules and 'engine.run' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    loaded, engine_loaded = done.stdout.splitlines()
    assert json.loads(loaded) == []
    assert engine_loaded == "True"
