"""Ensembles (``build(..., ensemble=N)``): N seeded networks, one store each, scores averaged.

Checked against each member opened on its own (``engine.open_run`` of its folder; member 0 as a
copy of the run folder without its members), the consistency against a loop over every member's
full argsort, refusals, the command-line option, and a build killed between members resuming to
the same scores."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine import InfluenceError, TrainConfig
from engine.build import partial_folder
from engine.ensemble import MEMBERS_DIR, consistency, member_folder
from engine.options import add_build_options, build_kwargs
from engine.query.knn import fastif_top_influences
from tests.small_data import write_blobs

ROOT = Path(__file__).resolve().parents[2]
N = 3
TRAIN = TrainConfig(epochs=4, polish_s=0, hidden=(8,))
OPTIONS = {"device": "cpu", "dtype": "float64", "ihvp": "exact", "ensemble": N, "train": TRAIN,
           "progress": False}
TESTS = [0, 5, 17]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blobs(tmp_path_factory.mktemp("ens-data") / "blobs.npz", n_train=150, n_test=40)


@pytest.fixture(scope="module")
def ens(tmp_path_factory: pytest.TempPathFactory, data: Path) -> engine.Run:
    return engine.build(str(data), "mlp", tmp_path_factory.mktemp("ens") / "run", **OPTIONS)


def _alone(run: engine.Run, tmp: Path) -> list[engine.Run]:
    """Every member opened as its own single-model run: member 0 from a copy of the run folder
    without ``members/`` and with ``ensemble`` 1, the others from their folders."""
    solo = tmp / "member0"
    shutil.copytree(run.path, solo, ignore=shutil.ignore_patterns(MEMBERS_DIR))
    doc = json.loads((solo / "run.json").read_text())
    doc["config"]["ensemble"] = 1
    (solo / "run.json").write_text(json.dumps(doc))
    return [engine.open_run(solo, device="cpu")] + [
        engine.open_run(member_folder(run.path, j), device="cpu") for j in range(1, N)]


def test_scores_are_the_mean_of_the_members_own(ens: engine.Run, tmp_path: Path) -> None:
    members = _alone(ens, tmp_path)
    assert all(m.ensemble is None for m in members)
    own = np.stack([m.scores(TESTS) for m in members])  # (N, n, m)
    np.testing.assert_allclose(ens.scores(TESTS), own.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ens.scores([5])[:, 0], own[:, :, 1].mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ens.member_scores(5), own[:, :, 1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ens.self_influence(), np.mean([m.self_influence() for m in members], 0),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ens.train_influence(7), np.mean([m.train_influence(7) for m in members], 0),
                               rtol=1e-10, atol=1e-10)
    # the members really differ: their own θ̂, so their own scores
    thetas = [m.model.theta.cpu().numpy() for m in members]
    assert len({m.info.model.fingerprint for m in members}) == N
    assert min(np.abs(a - b).max() for a in thetas for b in thetas if a is not b) > 1e-3
    assert np.abs(own[0] - own[1]).max() > 1e-3 * np.abs(own[0]).max()


def test_group_influence_averages_the_members(ens: engine.Run, tmp_path: Path) -> None:
    from engine.group import group_influence

    group = [1, 4, 9, 30]
    first = group_influence(ens, group, TESTS, order=1)
    # order 1 is −Σ_U I/n of the averaged scores
    np.testing.assert_allclose(first.predicted_loss_change, -ens.scores(TESTS)[group].sum(0) / ens.n_train,
                               rtol=1e-9, atol=1e-12)
    members = _alone(ens, tmp_path)
    second = group_influence(ens, group, TESTS, order=2)
    own = np.mean([group_influence(m, group, TESTS, order=2).predicted_loss_change for m in members], 0)
    np.testing.assert_allclose(second.predicted_loss_change, own, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(second.influence, -ens.n_train * own, rtol=1e-9, atol=1e-10)


def test_run_json_records_the_members(ens: engine.Run) -> None:
    meta = ens.info.raw["ensemble"]
    assert meta["members"] == N and meta["seeds"] == [0, 1, 2]
    assert len(meta["test_accuracy"]) == N and all(0 <= a <= 1 for a in meta["test_accuracy"])
    assert meta["folders"] == [".", "members/1", "members/2"]
    for j in range(1, N):
        doc = json.loads((member_folder(ens.path, j) / "run.json").read_text())
        assert doc["ensemble"] == {"member": j, "train_seed": j}
        assert doc["config"]["seed"] == 0 and doc["config"]["ensemble"] == 1  # same data
        assert doc["data"]["fingerprint"] == ens.info.data.fingerprint


def _naive_agree(member_scores: np.ndarray, i: int, side: int, k: int) -> float:
    """Share of members whose own score of i has the side's sign and whose full argsort puts i
    in its first k on that side (no ties in these float64 scores)."""
    return float(np.mean([side * s[i] > 0 and i in np.argsort(-side * s, kind="stable")[:k]
                          for s in member_scores]))


def test_explain_ranks_the_mean_and_says_how_consistent(ens: engine.Run, tmp_path: Path) -> None:
    members = _alone(ens, tmp_path)
    top = 6
    for t in TESTS:
        per = np.stack([m.scores([t])[:, 0] for m in members])  # (N, n)
        mean = per.mean(0)
        out = ens.explain(t, top=top)
        assert [r["train_id"] for r in out["helpful"]] == list(np.argsort(mean, kind="stable")[:top])
        assert [r["train_id"] for r in out["harmful"]] == list(np.argsort(-mean, kind="stable")[:top])
        shown = []
        for side, key in ((-1, "helpful"), (1, "harmful")):
            for r in out[key]:
                i, c = r["train_id"], r["consistency"]
                assert r["score"] == pytest.approx(mean[i], rel=1e-10)
                assert c["members"] == N
                assert c["agree"] == pytest.approx(_naive_agree(per, i, side, top))
                assert c["agree_count"] == round(c["agree"] * N)
                assert c["same_sign"] == pytest.approx(np.mean(side * per[:, i] > 0))
                assert c["cv"] == pytest.approx(per[:, i].std() / abs(mean[i]))
                shown.append(c["agree"])
        assert out["ensemble"]["members"] == N and out["ensemble"]["seeds"] == [0, 1, 2]
        assert out["ensemble"]["mean_agree"] == pytest.approx(np.mean(shown))


def test_consistency_by_hand() -> None:
    # 4 members, 5 training points; helpful side (most negative), top 2
    s = np.array([[-3.0, -2.0, -1.0, 0.5, 1.0],
                  [-1.0, -3.0, -2.0, 0.5, 1.0],
                  [2.0, -2.5, -3.0, -2.0, 1.0],
                  [-2.0, -0.5, 1.0, -3.0, 1.0]])
    c = consistency(s, np.array([0, 1]), side=-1, top=2)
    # point 0: member 0 (rank 1), member 1 (−1.0: 2 points further → out), member 2 (positive),
    # member 3 (rank 2) → 2/4; point 1: members 0, 1, 2 in their top 2, member 3 (−0.5) not → 3/4
    np.testing.assert_allclose(c["agree"], [0.5, 0.75])
    np.testing.assert_allclose(c["same_sign"], [0.75, 1.0])
    np.testing.assert_allclose(c["mean"], [-1.0, -2.0])
    np.testing.assert_allclose(c["cv"], [s[:, 0].std() / 1.0, s[:, 1].std() / 2.0])
    harmful = consistency(s, np.array([4]), side=1, top=1)  # member 2 ranks point 0 (+2.0) first
    np.testing.assert_allclose(harmful["agree"], [0.75])
    np.testing.assert_allclose(harmful["same_sign"], [1.0])
    assert np.isinf(consistency(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([0]), side=1, top=1)["cv"][0])


def test_fastif_and_uploads_use_the_averaged_scores(ens: engine.Run) -> None:
    t, top = 5, 5
    full = ens.explain(t, top=top)
    fast = fastif_top_influences(ens, [t], top=top, candidates=ens.n_train)[0]
    for key in ("helpful", "harmful"):
        assert [r["train_id"] for r in fast[key]] == [r["train_id"] for r in full[key]]
        np.testing.assert_allclose([r["score"] for r in fast[key]], [r["score"] for r in full[key]], rtol=1e-9)
    x = np.asarray(ens.dataset.x_test[t])
    up = ens.explain_input(x, label=int(ens.dataset.y_test[t]), top=top)
    for key in ("helpful", "harmful"):
        assert [r["train_id"] for r in up[key]] == [r["train_id"] for r in full[key]]
        for a, b in zip(up[key], full[key]):
            assert a["consistency"]["agree"] == b["consistency"]["agree"]
            assert a["consistency"]["cv"] == pytest.approx(b["consistency"]["cv"], rel=1e-9)
    assert up["ensemble"] == full["ensemble"]


def test_member_caches_share_the_runs_budget(ens: engine.Run) -> None:
    ens.train_influence(3)
    assert (("member", 1), ("test-grads",)) in ens.cache
    assert ens.cache.nbytes <= ens.cache.budget_bytes


def test_a_single_model_has_no_consistency(blobs_run: engine.Run) -> None:
    out = blobs_run.explain(0, top=3)
    assert "ensemble" not in out and blobs_run.ensemble is None
    assert all("consistency" not in r for r in out["helpful"] + out["harmful"])
    np.testing.assert_allclose(blobs_run.member_scores(0), blobs_run.scores([0]).T)


@pytest.mark.parametrize(("model", "ensemble", "message"), [
    ("logreg", 2, "convex"), ("svm", 3, "convex"), ("mlp", 0, ">= 1"), ("model.ts", 2, "user model")])
def test_refusals(tmp_path: Path, data: Path, model: str, ensemble: int, message: str) -> None:
    out = tmp_path / "runs" / "x"
    with pytest.raises(InfluenceError, match=message):
        engine.build(str(data), model, out, device="cpu", ensemble=ensemble, progress=False)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_cli_option() -> None:
    p = argparse.ArgumentParser()
    add_build_options(p)
    args = p.parse_args(["--data", "digits", "--model", "cnn", "--out", "x", "--ensemble", "5"])
    assert build_kwargs(args)["ensemble"] == 5
    assert build_kwargs(p.parse_args(["--data", "d", "--model", "m", "--out", "x"]))["ensemble"] == 1


KILL_AT_MEMBER_2 = """
import os, sys
from engine import TrainConfig
b = sys.modules["engine.build"]  # the module (engine.build is the function)
real = b._build_into
def dies_at_member_2(folder, config, **kw):
    if kw.get("member") == 2:
        os._exit(9)  # as a SIGKILL: no cleanup runs
    return real(folder, config, **kw)
b._build_into = dies_at_member_2
b.build(sys.argv[1], "mlp", sys.argv[2], device="cpu", dtype="float64", ihvp="exact", ensemble=3,
        train=TrainConfig(epochs=4, polish_s=0, hidden=(8,)), progress=False)
"""


def test_a_killed_ensemble_build_resumes(tmp_path: Path, data: Path, ens: engine.Run) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILL_AT_MEMBER_2, str(data), str(out)], cwd=ROOT,
                          env=env, timeout=300, check=False)
    assert done.returncode == 9 and not out.exists()
    tmp = partial_folder(out)
    assert (member_folder(tmp, 1) / "run.json").is_file()  # member 1 finished
    assert not (member_folder(tmp, 2) / "run.json").is_file()
    kept = (member_folder(tmp, 1) / "model.pt").stat().st_mtime_ns
    run = engine.build(str(data), "mlp", out, resume=True, **OPTIONS)
    assert (member_folder(out, 1) / "model.pt").stat().st_mtime_ns == kept  # not retrained
    np.testing.assert_allclose(run.scores(TESTS), ens.scores(TESTS), rtol=1e-8, atol=1e-8)
