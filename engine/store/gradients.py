"""The gradient store: a memory-mapped (n, d) array plus a self-describing manifest.

Written to ``grads.npy.tmp`` with a per-row done bitmap ``grads.npy.done`` (uint8, one byte per
row, itself a memory map): about once a second the rows written since are flushed first, then
their done bytes set and flushed, so a killed build knows which rows are in and a resumed one
(:class:`StoreWriter` with ``resume=True``) computes only the others. Several processes may
write disjoint row ranges of the same two files (the distributed build). ``finish`` renames
``grads.npy.tmp`` to ``grads.npy`` only when every row is in, drops the bitmap, then writes the
manifest (atomically); a crashed build therefore never leaves a store that opens.

Dtypes: float64, float32, float16 and bfloat16. NumPy has no bfloat16, so a bfloat16 store holds
the raw bits as uint16 in the ``.npy`` and says ``"dtype": "bfloat16"`` in the manifest;
:func:`as_torch` views them back as ``torch.bfloat16`` without a copy.
On open the manifest is checked against the file and against the fingerprints the caller expects.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunError, StaleRunError
from .files import load_json, save_json

__all__ = [
    "DONE_FILE",
    "GRADS_FILE",
    "MANIFEST_FILE",
    "PARTIAL_GRADS_FILE",
    "SCHEMA_VERSION",
    "STORE_DTYPES",
    "TORCH_DTYPES",
    "StoreWriter",
    "as_torch",
    "open_store",
    "to_store_numpy",
]

logger = logging.getLogger(__name__)

GRADS_FILE = "grads.npy"
MANIFEST_FILE = "manifest.json"
PARTIAL_GRADS_FILE = GRADS_FILE + ".tmp"
DONE_FILE = GRADS_FILE + ".done"
SCHEMA_VERSION = 1
# manifest dtype name → the NumPy dtype of the .npy file
STORE_DTYPES: dict[str, type] = {"float64": np.float64, "float32": np.float32,
                                 "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def to_store_numpy(block: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor block as the NumPy array the store file holds for ``dtype`` (bf16 → uint16 bits)."""
    t = block.detach().to(TORCH_DTYPES[dtype]).cpu()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def as_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The store (or a slice of it) as a torch tensor of ``dtype``: shares memory with a writable
    contiguous ``array``, copies a read-only one (a memory map opened for reading)."""
    arr = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


CHECKPOINT_S = 1.0  # seconds between syncs of the store and its done flags while writing


class StoreWriter:
    """Accepts row blocks in any order; ``finish`` makes the store visible.

    ``resume=True`` reopens ``grads.npy.tmp`` and its done bitmap if they exist with the same
    shape and dtype (and starts afresh otherwise); ``create=False`` opens files another process
    created (the distributed build: rank 0 creates, every rank writes its rows).
    """

    def __init__(self, folder: Path, *, n: int, dim: int, dtype: str, resume: bool = False,
                 create: bool = True) -> None:
        if dtype not in STORE_DTYPES:
            raise RunError(f"store dtype must be one of {sorted(STORE_DTYPES)}, not {dtype!r}")
        self.folder = folder
        self.n, self.dim, self.dtype = n, dim, dtype
        self._tmp = folder / PARTIAL_GRADS_FILE
        self._done_path = folder / DONE_FILE
        np_dtype = np.dtype(STORE_DTYPES[dtype])
        reuse = (resume or not create) and self._matches(np_dtype)
        if not reuse and not create:
            raise RunError(f"{self._tmp}: no partial store of shape ({n}, {dim}) {dtype} to write into")
        mode = "r+" if reuse else "w+"
        if not reuse:  # the bitmap first: a store file without one is never trusted
            self._done_path.unlink(missing_ok=True)
        self._array = np.lib.format.open_memmap(self._tmp, mode=mode, dtype=np_dtype, shape=(n, dim))
        self._done = np.lib.format.open_memmap(self._done_path, mode=mode, dtype=np.uint8, shape=(n,))
        self._pending: list[slice] = []  # rows written but not yet synced and flagged
        self._checkpointed = time.monotonic()

    def _matches(self, np_dtype: np.dtype) -> bool:
        if not (self._tmp.is_file() and self._done_path.is_file()):
            return False
        try:
            a = np.load(self._tmp, mmap_mode="r")
            d = np.load(self._done_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:  # a file cut short by a kill: start afresh
            logger.warning("%s: the partial store cannot be read (%s: %s); starting it afresh",
                           self._tmp, type(exc).__name__, exc)
            return False
        same = a.shape == (self.n, self.dim) and a.dtype == np_dtype and d.shape == (self.n,)
        if not same:
            logger.warning("%s: the partial store is %s %s, not (%d, %d) %s; starting it afresh",
                           self._tmp, a.shape, a.dtype, self.n, self.dim, np_dtype)
        return same

    def missing(self, rows: slice | None = None) -> np.ndarray:
        """Indices (int64, ascending) of rows in ``rows`` (default: all) not yet written."""
        start = 0 if rows is None else rows.start
        part = self._done[rows if rows is not None else slice(None)]
        return np.flatnonzero(part == 0).astype(np.int64) + start

    def write(self, rows: slice, block: torch.Tensor) -> None:
        """Write ``block`` (b, dim) to ``rows``; they are marked done at the next checkpoint."""
        values = to_store_numpy(block, self.dtype)
        if self.dtype == "float16" and not np.isfinite(values).all():
            raise RunError("a gradient does not fit in float16 (beyond ±65504); "
                           "use --store-dtype bfloat16 or float32")
        self._array[rows] = values
        self._pending.append(rows)
        if time.monotonic() - self._checkpointed >= CHECKPOINT_S:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Sync the rows written since the last checkpoint to disk, then flag them done (and sync
        the flags): a flag on disk always means its row's data is on disk, even after a power cut.
        Between checkpoints nothing is flagged, so a kill costs at most ``CHECKPOINT_S`` of work
        (instead of a sync of the whole mapping for every block)."""
        if self._pending:
            self._array.flush()
            for rows in self._pending:
                self._done[rows] = 1
            self._done.flush()
            self._pending.clear()
        self._checkpointed = time.monotonic()

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.checkpoint()
        missing = int((self._done == 0).sum())
        if missing:
            raise RunError(f"gradient store incomplete: {missing} rows missing")
        self._array.flush()
        del self._array, self._done
        os.replace(self._tmp, self.folder / GRADS_FILE)
        self._done_path.unlink(missing_ok=True)
        return self.write_manifest(self.folder, n=self.n, dim=self.dim, dtype=self.dtype,
                                   extra=manifest)

    @staticmethod
    def write_manifest(folder: Path, *, n: int, dim: int, dtype: str, extra: dict[str, Any]
                       ) -> dict[str, Any]:
        """Write (atomically) and return the manifest of the complete store in ``folder``."""
        full = {"schema_version": SCHEMA_VERSION, "n": n, "dim": dim, "dtype": dtype, **extra}
        save_json(folder / MANIFEST_FILE, full)
        return full

    def close(self) -> None:
        """Release the memory maps without finishing (another process finishes)."""
        self.checkpoint()
        del self._array, self._done


def open_store(folder: Path, *, expect: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The (n, d) read-only memory map and its manifest; checks ``expect`` keys against it.

    A bfloat16 store comes back as its uint16 bits; use :func:`as_torch` with the manifest's
    dtype to read it.
    """
    grads, man_path = folder / GRADS_FILE, folder / MANIFEST_FILE
    if not grads.exists() or not man_path.exists():
        raise RunError(f"{folder}: no complete gradient store ({GRADS_FILE} and {MANIFEST_FILE})")
    manifest = load_json(man_path)
    if not isinstance(manifest, dict):
        raise RunError(f"{man_path}: malformed manifest (not a JSON object)")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RunError(
            f"{folder}: store schema {manifest.get('schema_version')} is not {SCHEMA_VERSION}; rebuild the run"
        )
    try:
        array = np.load(grads, mmap_mode="r")
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, … on bad files
        raise RunError(f"{grads}: unreadable gradient store ({type(exc).__name__}: {exc})") from exc
    try:
        expected = (manifest["n"], manifest["dim"]), np.dtype(STORE_DTYPES[manifest["dtype"]])
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
