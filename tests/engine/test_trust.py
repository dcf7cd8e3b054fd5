"""The trust check: predicted against actual leave-one-out changes, per method and damping."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from app.cli import main as cli_main
from engine.trust import TRUST_FILE, load_trust, trust_check


def test_trust_check_on_a_convex_run(blobs_run: engine.Run) -> None:
    report = trust_check(blobs_run, test_index=[0, 3], top=4, methods=["exact", "cg"],
                         dampings=[0.0, 5.0])
    assert report["test_ids"] == [0, 3] and len(report["pairs"]) == len(report["actual"]) <= 8
    assert "exact optimum" in report["ground_truth"]
    assert report["noise_floor"] < 1e-9 < report["mean_abs_actual"]  # convex: retraining is exact
    rows = {(r["method"], r["damping"]): r for r in report["results"]}
    assert set(rows) == {("exact", 0.0), ("exact", 5.0), ("cg", 0.0), ("cg", 5.0)}
    assert rows[("exact", 0.0)]["pearson"] > 0.99
    assert rows[("cg", 0.0)]["pearson"] == pytest.approx(rows[("exact", 0.0)]["pearson"], abs=1e-6)
    # a large damping shrinks and distorts the predictions: they track retraining less well
    assert rows[("exact", 5.0)]["pearson"] < rows[("exact", 0.0)]["pearson"]
    saved = load_trust(blobs_run)
    assert saved is not None and saved["pairs"] == report["pairs"] and saved["results"] == report["results"]
    assert (blobs_run.path / TRUST_FILE).is_file()


def test_damping_what_if_equals_a_run_built_with_it(blobs_run: engine.Run, tmp_path, blobs_npz) -> None:
    other = engine.build(str(blobs_npz), "logreg", tmp_path / "d", weight_decay=1e-2, damping=0.3,
                         progress=False)
    np.testing.assert_allclose(blobs_run.scores([1, 2], damping=0.3), other.scores([1, 2]), rtol=1e-8)
    with pytest.raises(engine.QueryError, match="damping"):
        blobs_run.scores([1], damping=-1.0)


def test_trust_cli(blobs_run: engine.Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["trust", "--run", str(blobs_run.path), "--tests", "2", "--top", "3",
                     "--methods", "exact", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Pearson" in out and "noise floor" in out
    assert cli_main(["trust", "--run", str(blobs_run.path), "--test-index", "999"]) == 2
