"""The engine's CUDA paths against CPU float64 references (``bench/cuda_check.py``, one test per
check): skipped where there is no CUDA device. The harness itself is exercised on the CPU too, so
the script cannot rot between sessions that have a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_check():
    spec = importlib.util.spec_from_file_location("cuda_check", ROOT / "bench" / "cuda_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cuda_check", module)
    spec.loader.exec_module(module)
    return module


cuda_check = _load_check()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(cuda_check.CHECKS))
def test_cuda_path_matches_the_cpu_reference(name: str, tmp_path: Path) -> None:
    res = cuda_check.run_check(name, torch.device("cuda"), tmp_path)
    print(f"\n{name}: {res}")
    assert res["ok"], res


@pytest.mark.parametrize("name", ["products", "topk", "projected_opened_on_device"])
def test_the_checks_pass_on_the_cpu(name: str, tmp_path: Path) -> None:
    """The same checks with the CPU as the 'device' (the upcast half-precision path)."""
    res = cuda_check.run_check(name, torch.device("cpu"), tmp_path)
    assert res["ok"], res


def test_a_check_that_breaks_is_reported_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong product makes the products check fail (the checks can fail), and a crash is a FAIL
    line with its error, not a traceback that hides the other checks."""
    monkeypatch.setattr(cuda_check.ResidentStore, "products",
                        lambda self, s, block=None: iter([(0, self.data.float() @ s.float() * 1.01)]))
    assert not cuda_check.run_check("products", torch.device("cpu"), tmp_path)["ok"]
    monkeypatch.setattr(cuda_check, "CHECKS", {"boom": lambda device: 1 / 0})
    out = tmp_path / "res.json"
    assert cuda_check.main(["--device", "cpu", "--json", str(out)]) == 1
    assert "ZeroDivisionError" in out.read_text()
