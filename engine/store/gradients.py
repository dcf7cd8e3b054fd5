"""The gradient store: a memory-mapped (n, d) array plus a self-describing manifest.

Written to ``grads.npy.tmp`` and renamed to ``grads.npy`` only when every row is in, then the
manifest is written (atomically); a crashed build therefore never leaves a store that opens.
On open the manifest is checked against the file and against the fingerprints the caller expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunError, StaleRunError
from .files import load_json, save_json

__all__ = ["GRADS_FILE", "MANIFEST_FILE", "SCHEMA_VERSION", "StoreWriter", "open_store", "STORE_DTYPES"]

GRADS_FILE = "grads.npy"
MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
STORE_DTYPES = {"float64": np.float64, "float32": np.float32, "float16": np.float16}


class StoreWriter:
    """Accepts row blocks in any order; ``finish`` makes the store visible."""

    def __init__(self, folder: Path, *, n: int, dim: int, dtype: str) -> None:
        if dtype not in STORE_DTYPES:
            raise RunError(f"store dtype must be one of {sorted(STORE_DTYPES)}, not {dtype!r}")
        self.folder = folder
        self.n, self.dim, self.dtype = n, dim, dtype
        self._tmp = folder / (GRADS_FILE + ".tmp")
        self._array = np.lib.format.open_memmap(
            self._tmp, mode="w+", dtype=STORE_DTYPES[dtype], shape=(n, dim)
        )
        self._done = np.zeros(n, dtype=bool)

    def write(self, rows: slice, block: torch.Tensor) -> None:
        self._array[rows] = block.detach().cpu().numpy().astype(self._array.dtype, copy=False)
        self._done[rows] = True

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if not self._done.all():
            raise RunError(f"gradient store incomplete: {int((~self._done).sum())} rows missing")
        self._array.flush()
        del self._array
        os.replace(self._tmp, self.folder / GRADS_FILE)
        full = {"schema_version": SCHEMA_VERSION, "n": self.n, "dim": self.dim,
                "dtype": self.dtype, **manifest}
        save_json(self.folder / MANIFEST_FILE, full)
        return full


def open_store(folder: Path, *, expect: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The (n, d) read-only memory map and its manifest; checks ``expect`` keys against it."""
    grads, man_path = folder / GRADS_FILE, folder / MANIFEST_FILE
    if not grads.exists() or not man_path.exists():
        raise RunError(f"{folder}: no complete gradient store ({GRADS_FILE} and {MANIFEST_FILE})")
    manifest = load_json(man_path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RunError(
            f"{folder}: store schema {manifest.get('schema_version')} is not {SCHEMA_VERSION}; rebuild the run"
        )
    try:
        array = np.load(grads, mmap_mode="r")
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, … on bad files
        raise RunError(f"{grads}: unreadable gradient store ({type(exc).__name__}: {exc})") from exc
    try:
        expected = (manifest["n"], manifest["dim"]), STORE_DTYPES[manifest["dtype"]]
    except (KeyError, TypeError) as exc:
        raise RunError(f"{man_path}: malformed manifest ({exc})") from exc
    if array.shape != expected[0] or array.dtype != expected[1]:
        raise RunError(
            f"{grads}: shape {array.shape} {array.dtype} does not match the manifest "
            f"({manifest['n']}, {manifest['dim']}) {manifest['dtype']}"
        )
    for key, value in expect.items():
        if manifest.get(key) != value:
            raise StaleRunError(
                f"{folder}: the store was built for {key} {manifest.get(key)!r} but the run now has "
                f"{value!r}; rebuild it with `influence build`"
            )
    return array, manifest
