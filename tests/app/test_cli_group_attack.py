"""The ``influence group`` and ``influence attack`` commands, called in-process through ``main``;
each test builds its own small run (well under a second)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from tests.small_data import write_npz


def test_group_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`influence group`: order 1 is the sum of `scores` rows; a class group with --check retrains."""
    run_dir = tmp_path / "run"
    assert main(["build", "--data", str(write_npz(tmp_path / "d.npz")), "--model", "logreg",
                 "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["group", "--run", str(run_dir), "--train-index", "1", "4", "9",
                 "--test-index", "0", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["scores", "--run", str(run_dir), "--out", str(tmp_path / "s.npy"),
                 "--test-index", "0", "2"]) == 0
    want = np.load(tmp_path / "s.npy")[[1, 4, 9]].sum(axis=0)
    np.testing.assert_allclose([r["influence"] for r in out["results"]], want, rtol=1e-9)
    assert main(["group", "--run", str(run_dir), "--class", "0", "--fraction", "0.5", "--order", "2",
                 "--check"]) == 0
    assert "retrained" in capsys.readouterr().out
    assert main(["group", "--run", str(run_dir)]) == 2
    assert main(["group", "--run", str(run_dir), "--class", "7"]) == 2


def test_attack_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 4))
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "b.npz", X_train=x, y_train=y, X_test=np.array([[0.15, 0.0, 0.0, 0.0]]),
             y_test=np.array([1]))
    run_dir = tmp_path / "run"
    assert main(["build", "--data", str(tmp_path / "b.npz"), "--model", "logreg", "--out", str(run_dir),
                 "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "attack.npz"
    assert main(["attack", "--run", str(run_dir), "--test-index", "0", "--points", "10",
                 "--epsilon", "0.5", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["flipped"] is True and summary["predicted_after"] == 0
    with np.load(out) as z:
        assert z["train_ids"].tolist() == summary["train_ids"]
        assert np.abs(z["perturbed"] - z["original"]).max() <= 0.5 + 1e-12
        assert np.array_equal(z["original"], x[z["train_ids"]])
    assert main(["attack", "--run", str(run_dir), "--test-index", "5"]) == 2
    assert main(["attack", "--run", str(run_dir), "--test-index", "0", "--out", str(tmp_path / "a.txt")]) == 2
