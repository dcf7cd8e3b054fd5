"""A build killed (SIGKILL) at random points never leaves a run that opens with wrong scores:
either opening fails with a clear RunError, or the run (as found, or after ``--resume``) gives
the scores of an uninterrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.build import STATE_FILE, partial_folder

ROOT = Path(__file__).resolve().parents[2]
KILLS = 10
SETTINGS = ["--data", "digits", "--model", "logreg", "--weight-decay", "1e-2", "--device", "cpu",
            "--chunk-size", "4", "--quiet"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "build", *SETTINGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _phase(out: Path) -> str:
    """Where a killed build stopped, from what it left on disk."""
    if (out / "run.json").is_file():
        return "done"
    tmp = partial_folder(out)
    if not (tmp / STATE_FILE).is_file():
        return "finalising" if (tmp / "run.json").is_file() else "startup"
    state = json.loads((tmp / STATE_FILE).read_text())
    for stage, phase in (("training", "training"), ("store", "gradients"), ("curvature", "curvature")):
        if stage not in state:
            return phase
    return "finalising"


@pytest.mark.slow
def test_killed_builds_resume_to_the_uninterrupted_scores(tmp_path: Path) -> None:
    ref_out = tmp_path / "ref"
    t = time.perf_counter()
    subprocess.run(_command(ref_out), cwd=ROOT, env=_env(), check=True, timeout=300)
    duration = time.perf_counter() - t
    ref = engine.open_run(ref_out).scores()

    rng = np.random.default_rng(20240607)
    # one seeded random point in each tenth of the build: startup, data, training, store, curvature
    delays = (np.arange(KILLS) + rng.uniform(0.05, 0.95, KILLS)) / KILLS * duration
    phases: Counter[str] = Counter()
    for i, delay in enumerate(delays):
        out = tmp_path / f"killed-{i}"
        proc = subprocess.Popen(_command(out), cwd=ROOT, env=_env(), stderr=subprocess.DEVNULL)
        time.sleep(float(delay))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        phase = _phase(out)
        phases[phase] += 1
        try:
            run = engine.open_run(out)
        except engine.RunError as exc:
            assert phase != "done", exc
            assert str(out) in str(exc)  # names the folder
            done = subprocess.run(_command(out, "--resume"), cwd=ROOT, env=_env(),
                                  capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, done.stderr
            run = engine.open_run(out)
        np.testing.assert_allclose(run.scores(), ref, rtol=1e-6, atol=1e-12)
        assert not partial_folder(out).exists()
    print(f"\nkills by phase (build {duration:.1f} s): {dict(phases)}")
    assert sum(phases.values()) == KILLS


def test_resume_refuses_a_partial_build_with_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tmp = partial_folder(out)
    tmp.mkdir()
    (tmp / STATE_FILE).write_text(json.dumps({"config": {"data": "digits", "model": "mlp"}}))
    with pytest.raises(engine.RunError, match="other settings"):
        engine.build("digits", "logreg", out, device="cpu", progress=False, resume=True)
    assert tmp.is_dir() and not out.exists()  # left for the build it belongs to
