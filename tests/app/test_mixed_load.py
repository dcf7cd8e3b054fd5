"""The mixed-load benchmark (bench/mixed_load.py) as a correctness check, not a timing: a real
server under a short burst of concurrent influence queries, uploads, page loads and audit writes,
with a validation job running, answers every request correctly (zero errors). The 50-client,
60-second figures come from running the script itself."""

from __future__ import annotations

import sys
from pathlib import Path

from app.main import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import mixed_load


def test_mixed_load_has_no_errors(run_path: Path, tmp_path: Path) -> None:
    result = mixed_load.measure(run_path, clients=12, duration=6.0, seed=1, with_job=True,
                                log_path=tmp_path / "server.log")
    assert result["total"]["errors"] == 0, result["first_errors"]
    done = {r["kind"]: r["requests"] for r in result["rows"]}
    assert all(done[kind] > 0 for kind in mixed_load.MIX), done  # every kind was exercised
    assert result["job"] is not None and result["job"]["status"] in ("running", "done")
    assert result["influence_during_job"]["requests"] > 0
    log = (tmp_path / "server.log").read_text()
    assert mixed_load.API_KEY not in log
