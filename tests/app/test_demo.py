"""The demo (app/demo.py): Fashion-MNIST when its files are there, digits with a one-line hint
otherwise, a stale or broken demo run rebuilt. Fashion-MNIST is a tiny IDX folder written here
(10 classes of 8×8 images) that ``FASHION_MNIST_DIR`` is pointed at; no server is started."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import engine
from app import demo as demo_module
from app.demo import DIGITS_SPEC, FALLBACK_HINT, choose_spec, prepare_demo
from engine.data import idx
from engine.runinfo import RUN_FILE
from tests.engine.data_helpers import write_idx

N_TRAIN, N_TEST, SIDE = 40, 20, 8
TINY = {"train_size": 30, "test_size": 10, "train": {"epochs": 2, "polish_s": 0.0}}


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST's four IDX files (gzipped, as Debian ships them): class k brightens row k."""
    folder = tmp_path_factory.mktemp("fashion-mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 100, (n, SIDE, SIDE), dtype=np.uint8)
        x[np.arange(n), y % SIDE, :] = 255
        write_idx(folder / f"{split}-images-idx3-ubyte", x, gz=True)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz=True)
    return folder


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch, tiny_fashion: Path) -> Path:
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tiny_fashion)
    return tiny_fashion


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    empty = tmp_path / "no-fashion-mnist"
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", empty)
    return empty


def prepare(path: Path, **kw: Any) -> tuple[engine.Run, list[str]]:
    """prepare_demo with the tiny sizes; returns the run and the lines it printed."""
    err = io.StringIO()
    run = prepare_demo(path, progress=False, err=err, **{**TINY, **kw})
    return run, err.getvalue().splitlines()


def test_choose_spec_follows_the_installed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tiny_fashion: Path) -> None:
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tiny_fashion)
    spec, hint = choose_spec()
    assert (spec.data, spec.model, hint) == ("fashion-mnist", "cnn", None)
    assert spec.options["ihvp"] is engine.IHVPMethod.EKFAC
    # one file missing is not installed
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in sorted(tiny_fashion.iterdir())[:3]:
        (partial / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", partial)
    spec, hint = choose_spec()
    assert spec is DIGITS_SPEC and hint == FALLBACK_HINT
    assert "apt-get install dataset-fashion-mnist" in hint and "\n" not in hint


def test_builds_a_fashion_network_with_class_names_then_reuses_it(
        installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "runs" / "demo"
    threads, real_build = [], engine.build

    def build(*args: Any, **kw: Any) -> engine.Run:
        threads.append(torch.get_num_threads())
        return real_build(*args, **kw)

    monkeypatch.setattr(engine, "build", build)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run, lines = prepare(path)
        assert threads == [demo_module.DEMO_THREADS] and torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    info = run.info
    assert (info.config.data, info.model.kind) == ("fashion-mnist", engine.ModelKind.CNN)
    assert info.config.ihvp is engine.IHVPMethod.EKFAC
    assert (info.data.n_train, info.data.n_test) == (30, 10)
    assert info.data.class_names == idx.FASHION_MNIST_CLASSES
    assert info.config.train.epochs == 2
    assert not any("not installed" in line for line in lines)
    assert lines == [f"building the demo run {path}: {choose_spec(**TINY)[0].title}"]
    found = run.explain(0, top=3)  # the page's query answers
    assert len(found["helpful"]) == 3 and len(found["harmful"]) == 3
    created = json.loads((path / RUN_FILE).read_text())["created"]

    again, lines = prepare(path)
    assert lines == []  # current: reused, nothing built or printed
    assert json.loads((path / RUN_FILE).read_text())["created"] == created
    assert again.info.data.class_names == idx.FASHION_MNIST_CLASSES


def test_falls_back_to_digits_with_one_hint_line(missing: Path, tmp_path: Path) -> None:
    run, lines = prepare(tmp_path / "demo")
    assert (run.info.config.data, run.info.model.kind) == ("digits", engine.ModelKind.LOGREG)
    assert lines[0] == FALLBACK_HINT
    assert sum("Fashion-MNIST" in line for line in lines) == 1
    assert lines[1].startswith(f"building the demo run {tmp_path / 'demo'}: 8×8 digits")


def test_a_digits_run_is_rebuilt_once_fashion_mnist_is_installed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_fashion: Path) -> None:
    path = tmp_path / "demo"
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tmp_path / "absent")
    assert prepare(path)[0].info.config.data == "digits"
    monkeypatch.setattr(idx, "FASHION_MNIST_DIR", tiny_fashion)
    run, lines = prepare(path)
    assert run.info.config.data == "fashion-mnist"
    assert lines[0].startswith(f"rebuilding the demo run {path}: its settings differ")
    assert "data: digits → fashion-mnist" in lines[0] and "model: logreg → cnn" in lines[0]
    assert engine.open_run(path).info.data.class_names == idx.FASHION_MNIST_CLASSES


def _old_engine(path: Path) -> str:
    doc = json.loads((path / RUN_FILE).read_text())
    doc["versions"]["engine"] = "0.0.1"
    (path / RUN_FILE).write_text(json.dumps(doc))
    return "it was built by engine 0.0.1"


def _broken(path: Path) -> str:
    doc = json.loads((path / RUN_FILE).read_text())
    doc["schema_version"] = -1
    (path / RUN_FILE).write_text(json.dumps(doc))
    return "it does not open"


@pytest.mark.parametrize("spoil", [_old_engine, _broken], ids=["older-engine", "broken"])
def test_an_old_or_broken_run_is_rebuilt(installed: Path, tmp_path: Path, spoil: Any) -> None:
    path = tmp_path / "demo"
    prepare(path)
    expected = spoil(path)
    lines = prepare(path)[1]
    assert lines[0].startswith(f"rebuilding the demo run {path}: {expected}")
    assert json.loads((path / RUN_FILE).read_text())["versions"]["engine"] == demo_module.ENGINE_VERSION
    assert engine.open_run(path).info.data.class_names == idx.FASHION_MNIST_CLASSES
    assert prepare(path)[1] == []  # and current afterwards


def test_other_demo_settings_and_rebuild_flag_rebuild(installed: Path, tmp_path: Path) -> None:
    path = tmp_path / "demo"
    prepare(path)
    run, lines = prepare(path, train={"epochs": 3, "polish_s": 0.0})
    assert "train.epochs: 2 → 3" in lines[0] and run.info.config.train.epochs == 3
    run, lines = prepare(path, train={"epochs": 3, "polish_s": 0.0}, rebuild=True)
    assert lines[0] == f"rebuilding the demo run {path}: --rebuild was asked for"


def test_a_folder_that_is_not_a_run_is_left_alone(installed: Path, tmp_path: Path) -> None:
    path = tmp_path / "demo"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(engine.RunError, match="exists and is not a run"):
        prepare(path)
    assert (path / "notes.txt").read_text() == "mine"
    assert demo_module.main([str(path), "--quiet"]) == 2


def test_demo_serves_the_prepared_run(installed: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    served: dict[str, Any] = {}

    def fake_serve(run_path: Path, *, host: str, port: int, run: engine.Run) -> None:
        served.update(path=run_path, host=host, port=port, run=run)

    monkeypatch.setattr("app.main.serve", fake_serve)
    path = tmp_path / "demo"
    monkeypatch.setattr(demo_module, "prepare_demo",  # the tiny sizes
                        lambda p, *, rebuild: prepare_demo(p, rebuild=rebuild, progress=False, **TINY))
    assert demo_module.demo("127.0.0.1", 8123, path=path) == 0
    assert (served["path"], served["host"], served["port"]) == (path, "127.0.0.1", 8123)
    assert served["run"].info.data.class_names == idx.FASHION_MNIST_CLASSES


def test_main_builds_without_serving(missing: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_module.main([str(tmp_path / "demo"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"demo run ready: {tmp_path / 'demo'}")
    assert err.splitlines()[0] == FALLBACK_HINT


def test_the_image_installs_fashion_mnist_and_builds_the_demo_on_first_start() -> None:
    text = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"apt-get install -y --no-install-recommends {idx.FASHION_MNIST_PACKAGE}" in text
    cmd = next(line for line in text.splitlines() if line.startswith("CMD"))
    # built only where no run is there yet (a team's own run is never replaced), then served
    assert 'test -f \\"$INFLUENCE_RUN/run.json\\" || python -m app.demo \\"$INFLUENCE_RUN\\"' in cmd
    assert "exec influence serve" in cmd
