"""Tests for the ``influence`` command line (app/cli.py), called in-process through ``main``.

One module-scoped run (CPU, float64) on a small seeded ``.npz`` (120 train / 40 test, 6 features, 3 classes)
is shared by every query test; the build tests make their own (they take well under a second).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import engine
from app.cli import main
from tests.small_data import N_PARAMS, N_TEST, N_TRAIN, write_npz

PREFIX = "influence: error: "
QUIET_CPU = ("--quiet", "--device", "cpu")  # no progress bars; float64 on any machine


# ---------------------------------------------------------------------------------------------
# helpers and fixtures


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "small.npz")


@pytest.fixture(scope="module")
def nan_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("nan") / "nan.npz", nan=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, npz: Path) -> engine.Run:
    out = tmp_path_factory.mktemp("runs") / "small-logreg"
    return engine.build(str(npz), "logreg", out, weight_decay=1e-2, ihvp="exact", device="cpu",
                        progress=False)


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(rc: int, err: str) -> str:
    """Asserts the contract's bad-input shape and returns the message after the prefix."""
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith(PREFIX), lines[0]
    message = lines[0][len(PREFIX):].strip()
    assert message, "the error line names no problem"
    return message


def no_temp_files(folder: Path) -> None:
    stray = [p.name for p in folder.rglob("*") if ".tmp" in p.name or ".building-" in p.name]
    assert not stray, f"stray temporary files: {stray}"


# ---------------------------------------------------------------------------------------------
# build


def test_build_writes_a_run_folder_and_prints_a_summary(capsys, npz, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", out, *QUIET_CPU)
    assert rc == 0, err
    for name in ("run.json", "grads.npy", "manifest.json", "model.pt", "curvature.pt"):
        assert (out / name).is_file(), name
    assert stdout.startswith(f"built {out}: logreg ({N_PARAMS} parameters)")
    assert "test accuracy" in stdout
    assert np.load(out / "grads.npy").shape == (N_TRAIN, N_PARAMS)
    no_temp_files(tmp_path)
    assert engine.open_run(out).n_train == N_TRAIN


def test_build_json_summary(capsys, npz, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", out,
                          *QUIET_CPU, "--json", "--weight-decay", "0.05")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["model"] == "logreg"
    assert summary["n_params"] == N_PARAMS
    assert (summary["n_train"], summary["n_test"]) == (N_TRAIN, N_TEST)
    assert 0.5 < summary["test_accuracy"] <= 1.0  # the problem is learnable
    assert 0 <= summary["grad_norm"] < 1e-8
    assert summary["ihvp"] == "exact"
    assert engine.open_run(out).config.weight_decay == 0.05


def test_build_refuses_existing_out_and_force_replaces_it(capsys, npz, tmp_path):
    out = tmp_path / "run"
    assert cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", out, *QUIET_CPU)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    rc, stdout, err = cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", out,
                          *QUIET_CPU, "--weight-decay", "0.1")
    assert "already exists" in error_line(rc, err)
    assert stdout == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched

    rc, _, err = cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", out,
                     *QUIET_CPU, "--weight-decay", "0.1", "--force")
    assert rc == 0, err
    assert engine.open_run(out).config.weight_decay == 0.1
    assert (out / "grads.npy").read_bytes() != before["grads.npy"]  # θ̂ moved with λ
    no_temp_files(tmp_path)


# ---------------------------------------------------------------------------------------------
# queries


def test_scores_selected_columns_in_given_order(capsys, run, outdir):
    f = outdir / "s.npy"
    rc, _, err = cli(capsys, "scores", "--run", run.path, "--out", f, "--test-index", 3, 1)
    assert rc == 0, err
    got = np.load(f)
    assert got.shape == (N_TRAIN, 2)
    assert got.dtype.kind == "f"
    assert np.allclose(got, run.scores([3, 1]), rtol=1e-10, atol=0)
    assert np.allclose(got[:, 0], run.scores([3])[:, 0], rtol=1e-10, atol=0)  # column 0 is test 3
    assert np.allclose(got[:, 1], run.scores([1])[:, 0], rtol=1e-10, atol=0)
    assert not np.allclose(got[:, 0], got[:, 1])
    assert sorted(p.name for p in outdir.iterdir()) == ["s.npy"]


def test_scores_all_test_points(capsys, run, outdir):
    f = outdir / "all.npy"
    rc, _, err = cli(capsys, "scores", "--run", run.path, "--out", f)
    assert rc == 0, err
    got = np.load(f)
    assert got.shape == (N_TRAIN, N_TEST)
    assert np.allclose(got, run.scores(), rtol=1e-10, atol=0)


def test_scores_cg_matches_exact(capsys, run, outdir):
    f = outdir / "cg.npy"
    rc, stdout, err = cli(capsys, "scores", "--run", run.path, "--out", f, "--test-index", 0, 7,
                          "--ihvp", "cg", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["method"] == "cg"  # the override is the method actually used
    assert np.allclose(np.load(f), run.scores([0, 7], ihvp="exact"), rtol=1e-6, atol=0)


def test_self_influence(capsys, run, outdir):
    f = outdir / "self.npy"
    rc, _, err = cli(capsys, "self", "--run", run.path, "--out", f)
    assert rc == 0, err
    got = np.load(f)
    assert got.shape == (N_TRAIN,)
    assert np.allclose(got, run.self_influence(), rtol=1e-10, atol=0)
    assert (got < 0).all()  # −gᵀH⁻¹g with H positive definite


def test_params(capsys, run, outdir):
    f = outdir / "p.npy"
    rc, _, err = cli(capsys, "params", "--run", run.path, "--train-index", 0, "--out", f)
    assert rc == 0, err
    got = np.load(f)
    assert got.shape == (N_PARAMS,)
    assert np.allclose(got, run.params(0), rtol=1e-10, atol=0)
    assert not np.allclose(got, run.params(1))


def test_explain_json(capsys, run):
    top = 5
    rc, stdout, err = cli(capsys, "explain", "--run", run.path, "--test-index", 4, "--top", top, "--json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["test_id"] == 4
    helpful = [r["score"] for r in result["helpful"]]
    harmful = [r["score"] for r in result["harmful"]]
    assert len(helpful) == len(harmful) == top
    assert helpful == sorted(helpful)  # most negative first
    assert harmful == sorted(harmful, reverse=True)  # most positive first
    assert max(helpful) <= min(harmful)
    column = run.scores([4])[:, 0]
    order = np.argsort(column)
    assert [r["train_id"] for r in result["helpful"]] == order[:top].tolist()
    assert [r["train_id"] for r in result["harmful"]] == order[::-1][:top].tolist()
    y_train = run.dataset.y_train
    assert all(r["label"] == int(y_train[r["train_id"]]) for r in result["helpful"] + result["harmful"])


def test_explain_prints_a_table(capsys, run):
    rc, stdout, err = cli(capsys, "explain", "--run", run.path, "--test-index", 2, "--top", 3)
    assert rc == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("test point 2:")
    assert "  helpful:" in lines and "  harmful:" in lines
    rows = [line for line in lines if line.strip().startswith("train ")]
    assert len(rows) == 6
    result = run.explain(2, top=3)
    assert f"train {result['helpful'][0]['train_id']:>7}" in rows[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(stdout)


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line on stderr naming the problem, nothing written

# (argv builder taking p = (run, out, npz, nan) paths, words the message must contain)
QUERY_ERRORS = {
    "missing --out": (lambda p: ["scores", "--run", p.run], "--out"),
    "missing --run": (lambda p: ["self", "--out", p.out / "x.npy"], "--run"),
    "missing --train-index": (lambda p: ["params", "--run", p.run, "--out", p.out / "x.npy"],
                              "--train-index"),
    "missing build --model": (lambda p: ["build", "--data", p.npz, "--out", p.out / "run"], "--model"),
    "missing command": (lambda p: [], "command"),
    "unknown subcommand": (lambda p: ["frobnicate", "--run", p.run], "frobnicate"),
    "unknown ihvp": (lambda p: ["scores", "--run", p.run, "--out", p.out / "x.npy", "--ihvp", "magic"],
                     "magic"),
    "unknown build ihvp": (lambda p: ["build", "--data", p.npz, "--model", "logreg",
                                      "--out", p.out / "run", "--ihvp", "magic"], "magic"),
    "test index out of range": (lambda p: ["scores", "--run", p.run, "--out", p.out / "x.npy",
                                           "--test-index", 0, N_TEST], f"{N_TEST}"),
    "negative test index": (lambda p: ["scores", "--run", p.run, "--out", p.out / "x.npy",
                                       "--test-index", -1], "-1"),
    "explain test index out of range": (lambda p: ["explain", "--run", p.run, "--test-index", 999],
                                        "999"),
    "train index out of range": (lambda p: ["params", "--run", p.run, "--out", p.out / "x.npy",
                                            "--train-index", N_TRAIN], f"{N_TRAIN}"),
    "top 0": (lambda p: ["explain", "--run", p.run, "--test-index", 0, "--top", 0], "top"),
    "out without .npy": (lambda p: ["self", "--run", p.run, "--out", p.out / "x.txt"], ".npy"),
    "out folder missing": (lambda p: ["self", "--run", p.run, "--out", p.out / "missing" / "x.npy"],
                           "does not exist"),
    "run is not a run": (lambda p: ["self", "--run", p.out, "--out", p.out / "x.npy"], "not a run"),
    "run does not exist": (lambda p: ["self", "--run", p.out / "nope", "--out", p.out / "x.npy"],
                           "not a run"),
    "projected on full run": (lambda p: ["scores", "--run", p.run, "--out", p.out / "x.npy",
                                         "--ihvp", "projected"], "projected"),
    "data does not exist": (lambda p: ["build", "--data", p.out / "nope.npz", "--model", "logreg",
                                       "--out", p.out / "run", *QUIET_CPU], "nope.npz"),
    "data with NaN": (lambda p: ["build", "--data", p.nan, "--model", "logreg",
                                 "--out", p.out / "run", *QUIET_CPU], "nan"),
    "unknown model": (lambda p: ["build", "--data", p.npz, "--model", "resnet9000",
                                 "--out", p.out / "run", *QUIET_CPU], "resnet9000"),
    "negative weight decay": (lambda p: ["build", "--data", p.npz, "--model", "logreg",
                                         "--out", p.out / "run", "--weight-decay", "-0.5", *QUIET_CPU],
                              "weight-decay"),
    "project with an hvp method": (lambda p: ["build", "--data", p.npz, "--model", "logreg",
                                              "--out", p.out / "run", "--project", 4, "--ihvp", "cg",
                                              *QUIET_CPU],
                                   "full gradients"),
    "kronecker without project": (lambda p: ["build", "--data", p.npz, "--model", "logreg",
                                             "--out", p.out / "run", "--projection", "kronecker",
                                             *QUIET_CPU],
                                  "--project K"),
}


@pytest.mark.parametrize("case", list(QUERY_ERRORS))
def test_bad_input_exits_2_with_one_line(capsys, run, outdir, npz, nan_npz, case):
    make_argv, words = QUERY_ERRORS[case]
    paths = SimpleNamespace(run=run.path, out=outdir, npz=npz, nan=nan_npz)
    rc, stdout, err = cli(capsys, *make_argv(paths))
    message = error_line(rc, err)
    assert words.lower() in message.lower(), message
    assert stdout == ""
    assert list(outdir.iterdir()) == [], "a failing command left files behind"
    assert sorted(p.name for p in run.path.iterdir()) == [
        "curvature.pt", "grads.npy", "manifest.json", "model.pt", "run.json"]


@pytest.mark.parametrize("make_argv", [
    lambda run, f: ["scores", "--run", run, "--out", f, "--test-index", N_TEST + 5],
    lambda run, f: ["params", "--run", run, "--out", f, "--train-index", -3],
    lambda run, f: ["self", "--run", f.parent, "--out", f],  # --run is not a run folder
], ids=["scores-bad-test-index", "params-bad-train-index", "self-bad-run"])
def test_failing_command_does_not_clobber_existing_output(capsys, run, outdir, make_argv):
    f = outdir / "FILE.npy"
    old = np.arange(5.0)
    np.save(f, old)
    rc, _, err = cli(capsys, *make_argv(run.path, f))
    error_line(rc, err)
    assert f.is_file(), "the existing output file was deleted"
    assert np.array_equal(np.load(f), old)
    assert sorted(p.name for p in outdir.iterdir()) == ["FILE.npy"]


def test_successful_command_replaces_existing_output(capsys, run, outdir):
    f = outdir / "FILE.npy"
    np.save(f, np.arange(5.0))
    rc, _, err = cli(capsys, "self", "--run", run.path, "--out", f)
    assert rc == 0, err
    assert np.load(f).shape == (N_TRAIN,)
    assert sorted(p.name for p in outdir.iterdir()) == ["FILE.npy"]


def test_out_naming_an_existing_folder_is_refused(capsys, run, outdir):
    target = outdir / "looks-like-a-file.npy"
    target.mkdir()
    rc, _, err = cli(capsys, "self", "--run", run.path, "--out", target)
    error_line(rc, err)
    assert target.is_dir() and list(target.iterdir()) == []
    no_temp_files(outdir)


def test_build_force_over_a_file_is_handled(capsys, npz, outdir):
    target = outdir / "run"
    target.write_text("not a run")
    rc, _, err = cli(capsys, "build", "--data", npz, "--model", "logreg", "--out", target,
                     *QUIET_CPU, "--force")
    if rc == 0:
        assert (target / "run.json").is_file()
    else:
        error_line(rc, err)
        assert target.read_text() == "not a run"
    no_temp_files(outdir)


def test_failed_build_creates_no_parent_folders(capsys, outdir):
    rc, _, err = cli(capsys, "build", "--data", outdir / "nope.npz", "--model", "logreg",
                     "--out", outdir / "a" / "b" / "run", *QUIET_CPU)
    error_line(rc, err)
    assert list(outdir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the real console script


def _influence_exe() -> str:
    exe = Path(sys.executable).parent / "influence"
    if exe.is_file():
        return str(exe)
    found = shutil.which("influence")
    assert found, "the influence console script is not installed"
    return found


def test_console_script_end_to_end(run, outdir):
    exe = _influence_exe()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    f = outdir / "sub.npy"
    done = subprocess.run([exe, "scores", "--run", str(run.path), "--out", str(f),
                           "--test-index", "5", "2"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert np.allclose(np.load(f), run.scores([5, 2]), rtol=1e-10, atol=0)

    bad = subprocess.run([exe, "scores", "--run", str(run.path), "--out", str(outdir / "bad.npy"),
                          "--test-index", "-7"], capture_output=True, text=True, timeout=120, env=env,
                         check=False)
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith(PREFIX) and "-7" in bad.stderr
    assert not (outdir / "bad.npy").exists()


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path) -> None:
    """`influence explain --json | head -1`: the closed pipe ends the command quietly (141)."""
    import subprocess
    import sys

    import engine

    run = engine.build("digits", "logreg", tmp_path / "run", test_size=20, progress=False)
    with subprocess.Popen([sys.executable, "-m", "app.cli", "explain", "--run", str(run.path),
                           "--test-index", "0", "--top", "1000", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == b"{"
        proc.stdout.close()  # the reader leaves before the ~150 kB of JSON (over a pipe buffer) are written
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
