"""Atomic file helpers: everything is written under a temporary name, then renamed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import RunError

__all__ = ["atomic_write_bytes", "load_json", "load_run_report", "load_tensors", "save_json", "save_tensors"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: Path) -> Any:
    """The parsed JSON file; :class:`RunError` if it is missing or corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors saved by :func:`save_tensors`; :class:`RunError` if missing or corrupt."""
    try:
        out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, runtime) on bad files
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, dict) or not all(isinstance(v, torch.Tensor) for v in out.values()):
        raise RunError(f"{path}: not a tensor file written by influence build")
    return out


def load_run_report(run_or_path: Any, name: str) -> dict[str, Any] | None:
    """The JSON report ``name`` saved in a run folder (a ``Run`` or its path), or None when absent
    (trust.json, mislabel.json, brittleness.json)."""
    path = Path(getattr(run_or_path, "path", run_or_path)) / name
    return load_json(path) if path.is_file() else None
