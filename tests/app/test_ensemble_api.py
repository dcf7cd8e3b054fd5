"""An ensemble run (``--ensemble 3``, a small mlp) served: the influence route ranks the members'
mean score and every listed training point carries its consistency across the members; the other
routes answer with the averaged scores; the test-point page renders the consistency display."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import engine
from app.main import create_app
from app.settings import Settings
from engine import TrainConfig

from .conftest import N_TRAIN, write_image_npz

MEMBERS = 3
TOP = 5


def build_ensemble_run(folder: Path, *, members: int = MEMBERS) -> Path:
    """A float64 mlp ensemble on the package's 8×8 image .npz (seconds on a CPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = write_image_npz(folder / "images.npz")
    out = folder / "ensemble"
    engine.build(str(npz), "mlp", out, device="cpu", dtype="float64", ihvp="exact", ensemble=members,
                 train=TrainConfig(epochs=6, polish_s=0, hidden=(8,)), progress=False)
    return out


@pytest.fixture(scope="module")
def ens_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    run = build_ensemble_run(tmp_path_factory.mktemp("ensemble"))
    with TestClient(create_app(Settings(run=run))) as c:
        yield c


def test_influence_items_carry_their_consistency(ens_client: TestClient) -> None:
    r = ens_client.get(f"/api/v1/test-points/3/influence?top={TOP}")
    assert r.status_code == 200
    body = r.json()
    assert body["ensemble"]["members"] == MEMBERS and body["ensemble"]["seeds"] == [0, 1, 2]
    scores = np.asarray(ens_client.get("/api/v1/test-points/3/scores").json()["scores"])
    run = ens_client.app.state.run  # type: ignore[attr-defined]
    per = np.stack([m.queries.scores_for_gradients(m.queries.test_gradients([3]))[:, 0].numpy()
                    for m in run.ensemble.members()])  # (N, n): each member's own
    np.testing.assert_allclose(scores, per.mean(0), rtol=1e-10)
    for key, side in (("helpful", -1), ("harmful", 1)):
        items = body[key]
        assert len(items) == TOP
        assert [i["train_id"] for i in items] == list(np.argsort(-side * scores, kind="stable")[:TOP])
        for item in items:
            c = item["consistency"]
            assert c["members"] == MEMBERS and 0 <= c["agree"] <= 1
            assert c["agree_count"] == round(c["agree"] * MEMBERS)
            i = item["train_id"]
            assert c["same_sign"] == pytest.approx(np.mean(side * per[:, i] > 0))
    shown = [i["consistency"]["agree"] for i in body["helpful"] + body["harmful"]]
    assert body["ensemble"]["mean_agree"] == pytest.approx(np.mean(shown))


def test_other_routes_answer_with_the_averaged_scores(ens_client: TestClient) -> None:
    run = ens_client.app.state.run  # type: ignore[attr-defined]
    fast = ens_client.get(f"/api/v1/test-points/3/influence?top={TOP}&fastif={N_TRAIN}").json()
    full = ens_client.get(f"/api/v1/test-points/3/influence?top={TOP}").json()
    assert [i["train_id"] for i in fast["helpful"]] == [i["train_id"] for i in full["helpful"]]
    train = ens_client.get("/api/v1/train-points/4/influence?top=3").json()
    means = np.mean([m.queries.train_influence(4) for m in run.ensemble.members()], axis=0)
    assert train["helpful"][0]["score"] == pytest.approx(means.min(), rel=1e-10)
    ranking = ens_client.get("/api/v1/self-influence?top=3").json()
    assert ranking["items"][0]["self_influence"] == pytest.approx(
        run.self_influence()[ranking["items"][0]["train_id"]])


def test_the_test_point_page_shows_the_consistency(ens_client: TestClient) -> None:
    r = ens_client.get(f"/test-points/3?top={TOP}")
    assert r.status_code == 200 and r.template.name == "test_point.html"  # type: ignore[attr-defined]
    assert r.context["influence"]["ensemble"]["members"] == MEMBERS  # type: ignore[attr-defined]
    assert r.text.count("models agree</span>") == 2 * TOP
    assert f"averaged over <strong>{MEMBERS} independently trained models" in r.text
    assert "/static/ensemble.css" in r.text
    assert ens_client.get("/static/ensemble.css").status_code == 200


def test_the_overview_and_summary_name_the_ensemble(ens_client: TestClient) -> None:
    summary = ens_client.get("/api/v1/summary").json()
    assert summary["ensemble"]["members"] == MEMBERS and len(summary["ensemble"]["test_accuracy"]) == MEMBERS
    page = ens_client.get("/").text
    assert f"{MEMBERS} independently seeded models" in page and 'id="ensemble"' in page


def test_cli_explain_prints_the_agreement(ens_client: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    run = ens_client.app.state.settings.run if hasattr(ens_client.app.state, "settings") else None
    if run is None:
        pytest.skip("the app does not expose its run folder")
    assert main(["explain", "--run", str(run), "--test-index", "3", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert f"averaged over {MEMBERS} models" in out
    assert out.count(f"/{MEMBERS}") == 8  # every listed row says how many models agree
