"""Shared builders for the engine.data tests: small in-memory arrays, .npz files, PNG folders and
IDX files written by hand (so the parser is checked against an independent writer)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data import Dataset


def make_arrays(
    *, n_train: int = 6, n_test: int = 4, shape: tuple[int, ...] = (3,), seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X_train": rng.normal(size=(n_train, *shape)),
        "y_train": np.arange(n_train) % 3,
        "X_test": rng.normal(size=(n_test, *shape)),
        "y_test": np.arange(n_test) % 3,
    }


def save_npz(tmp_path: Path, name: str = "data.npz", **arrays: object) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def make_dataset(**overrides: object) -> Dataset:
    a = make_arrays()
    fields: dict[str, object] = {
        "x_train": a["X_train"],
        "y_train": a["y_train"],
        "x_test": a["X_test"],
        "y_test": a["y_test"],
        "class_names": ("a", "b", "c"),
        "source": "memory",
    }
    fields.update(overrides)
    return Dataset(**fields)  # type: ignore[arg-type]


def write_png(path: Path, pixels: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=mode).save(path)


_IDX_CODES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(a: np.ndarray, *, code: int | None = None) -> bytes:
    """An IDX file's bytes, written by hand: 00 00 code ndim, big-endian u32 sizes, data."""
    big = a.astype(a.dtype.newbyteorder(">")) if a.dtype.itemsize > 1 else a
    code = _IDX_CODES[big.dtype.str.lstrip("|")] if code is None else code
    header = bytes([0, 0, code, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
    return header + big.tobytes()


def write_idx(path: Path, a: np.ndarray, *, gz: bool = False) -> Path:
    data = idx_bytes(a)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _idx_arrays(
    *, n_train: int = 12, n_test: int = 6, shape: tuple[int, ...] = (4, 3), seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 3).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 3).astype(np.uint8),
    }


def write_idx_dir(folder: Path, *, gz: bool | tuple[bool, ...] = False,
                  **kw: object) -> dict[str, np.ndarray]:
    arrays = _idx_arrays(**kw)  # type: ignore[arg-type]
    flags = gz if isinstance(gz, tuple) else (gz,) * 4
    for (stem, a), flag in zip(arrays.items(), flags, strict=True):
        write_idx(folder / stem, a, gz=flag)
    return arrays
