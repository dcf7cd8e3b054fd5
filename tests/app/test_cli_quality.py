"""The reliability commands of ``influence`` (app/cli_quality.py): ``lds``, ``mislabels`` and
``brittleness``, called in-process through ``main`` on a small seeded logreg run (120 train /
40 test), and one with 10% of its training labels flipped (recorded)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from app.cli import main
from engine.brittle import load_brittleness
from engine.lds import load_lds
from engine.mislabel import load_mislabel
from tests.small_data import N_TEST, N_TRAIN, write_npz

PREFIX = "influence: error: "
TINY = ("--subsets", "3", "--tests", "5")


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "small.npz")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, npz: Path) -> engine.Run:
    return engine.build(str(npz), "logreg", tmp_path_factory.mktemp("runs") / "logreg", weight_decay=1e-2,
                        device="cpu", progress=False)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory, npz: Path) -> engine.Run:
    return engine.build(str(npz), "logreg", tmp_path_factory.mktemp("runs") / "noisy", weight_decay=1e-2,
                        device="cpu", progress=False, label_noise=0.1)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_lds_json_is_the_saved_result(capsys: pytest.CaptureFixture[str], run: engine.Run) -> None:
    rc, out, err = cli(capsys, "lds", "--run", run.path, *TINY, "--output", "margin", "--json", "--quiet")
    assert rc == 0, err
    result = json.loads(out)
    assert {"lds", "ci95", "per_test", "subsets", "fraction", "output", "ihvp", "retraining"} <= set(result)
    assert result["subsets"] == 3 and result["fraction"] == 0.5 and result["output"] == "margin"
    assert result["retraining"] == "scratch" and result["ihvp"] == "exact" and len(result["test_ids"]) == 5
    lo, hi = result["ci95"]
    assert lo <= result["lds"] <= hi
    assert load_lds(run.path)[-1] == result
    assert err == ""  # --quiet: no progress bar


def test_lds_prints_a_summary_line_and_a_progress_bar(capsys: pytest.CaptureFixture[str],
                                                       run: engine.Run) -> None:
    rc, out, err = cli(capsys, "lds", "--run", run.path, *TINY, "--seed", "1")
    assert rc == 0, err
    first = out.splitlines()[0]
    found = re.match(r"LDS (-?\d\.\d\d) \(95% CI (-?\d\.\d\d)–(-?\d\.\d\d)\), 3 subsets of 50%, 5 test points", first)
    assert found is not None, first
    saved = next(r for r in load_lds(run.path) if r["seed"] == 1)
    assert found.group(1) == f"{saved['lds']:.2f}" and found.group(2) == f"{saved['ci95'][0]:.2f}"
    assert "ground truth:" in out
    assert "lds retrain" in err  # tqdm's bar on stderr


def test_lds_default_tests_fit_a_small_run(capsys: pytest.CaptureFixture[str], run: engine.Run) -> None:
    """Without --tests: 100 test points, or every one when the run has fewer (here 40)."""
    rc, out, err = cli(capsys, "lds", "--run", run.path, "--subsets", "3", "--json", "--quiet")
    assert rc == 0, err
    assert json.loads(out)["test_ids"] == list(range(N_TEST))


@pytest.mark.parametrize("args, words", [
    (("--subsets", "1"), "subsets"), (("--fraction", "1.5"), "fraction"), (("--tests", "0"), "tests"),
    (("--tests", str(N_TEST + 1)), "tests"), (("--test-index", str(N_TEST)), "out of range"),
    (("--output", "accuracy"), "--output"), (("--retraining", "hot"), "--retraining"),
    (("--ihvp", "newton"), "--ihvp"), (("--ihvp", "ekfac"), "ekfac"), (("--fraction", "0.001"), "fraction"),
    (("--subsets", "three"), "--subsets"),
])
def test_lds_bad_input_exits_2(capsys: pytest.CaptureFixture[str], run: engine.Run, args: tuple[str, ...],
                               words: str) -> None:
    before = load_lds(run.path)
    rc, out, err = cli(capsys, "lds", "--run", run.path, "--subsets", "3", "--quiet", *args)
    assert rc == 2 and out == ""
    assert err.startswith(PREFIX) and err.count("\n") == 1 and words in err, err
    assert load_lds(run.path) == before  # nothing saved


def test_a_missing_run_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for command in ("lds", "mislabels", "brittleness"):
        rc, _, err = cli(capsys, command, "--run", tmp_path / "nope")
        assert rc == 2 and err.startswith(PREFIX) and "run.json" in err


def test_mislabels_needs_recorded_flips(capsys: pytest.CaptureFixture[str], run: engine.Run) -> None:
    rc, out, err = cli(capsys, "mislabels", "--run", run.path)
    assert rc == 2 and out == "" and "--label-noise" in err and err.count("\n") == 1


def test_mislabels_table_and_json(capsys: pytest.CaptureFixture[str], noisy: engine.Run) -> None:
    rc, out, err = cli(capsys, "mislabels", "--run", noisy.path, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["n_flipped"] == round(0.1 * N_TRAIN) and report == load_mislabel(noisy.path)
    assert [s["score"] for s in report["scores"]] == ["self_influence", "loss", "grad_norm"]
    rc, out, err = cli(capsys, "mislabels", "--run", noisy.path, "--ihvp", "cg")
    assert rc == 0, err
    lines = out.splitlines()
    assert f"{report['n_flipped']} of {N_TRAIN} training labels flipped" in lines[0] and "ihvp cg" in lines[0]
    assert lines[1].split() == ["score", "AUC", "top", "1%", "top", "5%", "top", "10%", "top", "20%"]
    saved = load_mislabel(noisy.path)
    for row, s in zip(lines[2:], saved["scores"]):
        assert row.split()[:2] == [s["score"], f"{s['auc']:.3f}"]
        assert row.split()[4] == f"{100 * s['recall']['10']:.1f}%"


def test_brittleness_summary_is_the_saved_search(capsys: pytest.CaptureFixture[str], run: engine.Run) -> None:
    """One search (the JSON printing path is the one lds and mislabels test): the text names the
    median k and one line per test point, read against the saved brittleness.json."""
    rc, out, err = cli(capsys, "brittleness", "--run", run.path, "--test-index", "0", "1", "2",
                       "--max-k", "4", "--quiet")
    assert rc == 0, err
    report = load_brittleness(run.path)
    assert [t["test_id"] for t in report["results"]] == [0, 1, 2]
    for t in report["results"]:
        assert t["k"] is None or 1 <= t["k"] <= t["max_k"] <= 4
    ks = sorted(t["k"] if t["k"] is not None else float("inf") for t in report["results"])
    median = f"more than {max(t['max_k'] for t in report['results'])}" if ks[1] == float("inf") \
        else f"median k {ks[1]:g};"
    lines = out.splitlines()
    assert median in lines[0] and f"ihvp {report['ihvp']}" in lines[0] and len(lines) == 4
    for line, t in zip(lines[1:], report["results"]):
        assert line.split()[:2] == ["test", str(t["test_id"])]
        assert (f"k = {t['k']}" if t["k"] is not None else f"up to {t['max_k']}") in line


@pytest.mark.parametrize("args", [("--tests", "0"), ("--max-k", "0"), ("--test-index", str(N_TEST)),
                                  ("--tests", "x")])
def test_brittleness_bad_input_exits_2(capsys: pytest.CaptureFixture[str], run: engine.Run,
                                       args: tuple[str, ...]) -> None:
    rc, out, err = cli(capsys, "brittleness", "--run", run.path, "--quiet", *args)
    assert rc == 2 and out == "" and err.startswith(PREFIX) and err.count("\n") == 1, err


def test_the_installed_command_exits_2_on_bad_input(run: engine.Run) -> None:
    proc = subprocess.run([sys.executable, "-m", "app.cli", "lds", "--run", str(run.path), "--subsets", "1"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(PREFIX) and "subsets" in proc.stderr
