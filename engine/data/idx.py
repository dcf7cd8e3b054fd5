"""The IDX format (LeCun's MNIST files) and Fashion-MNIST from Debian's package.

An IDX file is a header and a C-order array, all big-endian::

    0x00 0x00 <dtype code> <ndim>   then ndim uint32 sizes   then prod(sizes) values

with dtype codes ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D``
float32, ``0x0E`` float64. Files may be gzipped (recognised by content, not by name).

``--data idx:DIR`` reads ``DIR/train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
``t10k-images-idx3-ubyte[.gz]`` and ``t10k-labels-idx1-ubyte[.gz]``, plus an optional
``class_names.txt`` (one name per line). ``--data fashion-mnist`` reads the same files from
:data:`FASHION_MNIST_DIR`, where Debian's ``dataset-fashion-mnist`` package puts them.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from engine.data.dataset import Dataset, derived_class_names, from_splits
from engine.errors import DataError

__all__ = [
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_PACKAGE",
    "IDX_CLASS_NAMES_FILE",
    "IDX_FILES",
    "IDX_PREFIX",
    "read_fashion_mnist",
    "read_idx",
    "read_idx_folder",
]

IDX_PREFIX = "idx:"
FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Read at call time, so tests can point it elsewhere (monkeypatch.setattr).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# (split, array name) -> file name without ".gz"
IDX_FILES: dict[tuple[str, str], str] = {
    ("train", "X"): "train-images-idx3-ubyte",
    ("train", "y"): "train-labels-idx1-ubyte",
    ("test", "X"): "t10k-images-idx3-ubyte",
    ("test", "y"): "t10k-labels-idx1-ubyte",
}
IDX_CLASS_NAMES_FILE = "class_names.txt"

_GZIP_MAGIC = b"\x1f\x8b"
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (gzipped or not), in native byte order.

    Returns:
        A read-only array of shape ``(d_1, ..., d_ndim)`` as the header gives it (uint8 files: a
        view of the file's bytes; other dtypes: native-endian). Parsed once per process while the
        file's path, size and modification time stay the same (a decompressed 60,000-image
        Fashion-MNIST read took 0.3 s per build).

    Raises:
        DataError: the file is unreadable, not gzip despite its magic, or not IDX: a bad magic
            number, an unknown dtype code, zero dimensions, a header cut short, or a data size
            that differs from ``prod(sizes) * itemsize`` (truncated or with trailing bytes).
    """
    name = str(path)
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {name!r}: {exc}") from exc
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        if len(_CACHE) >= CACHE_FILES:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        _CACHE[key] = _parse_idx(path)
    return _CACHE[key]


CACHE_FILES = 8  # parsed IDX files kept per process (Fashion-MNIST's four: 55 MB)
_CACHE: dict[tuple[str, int, int], np.ndarray] = {}  # (path, mtime, size) → read-only array


def _parse_idx(path: str | Path) -> np.ndarray:
    """:func:`read_idx` without the cache: the file read, unzipped and parsed (read-only)."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {name!r}: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"IDX file {name!r} is a corrupt or truncated gzip file: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"IDX file {name!r} is too short ({len(raw)} bytes) for an IDX header")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{name!r} is not an IDX file: magic number starts {raw[:2].hex()}, expected 0000"
        )
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise DataError(f"IDX file {name!r} has unknown dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"IDX file {name!r} declares 0 dimensions")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(
            f"IDX file {name!r} is truncated in its header: {ndim} dimensions need {start} "
            f"bytes, the file has {len(raw)}"
        )
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - start
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(
            f"IDX file {name!r} is {what}: shape {shape} of {dtype.name} needs {expected} "
            f"data bytes, found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape)
    if dtype.itemsize > 1:
        data = data.astype(dtype.newbyteorder("="))
        data.setflags(write=False)  # shared by every caller through the cache
    return data


def read_idx_folder(folder: str | Path, *, source: str) -> Dataset:
    """The four IDX files of ``folder`` as an unvalidated :class:`Dataset` (pixels unscaled).

    ``X`` keeps the file's dtype (uint8 for MNIST-style files; the caller divides by 255) and
    shape ``(n, H, W)`` (or whatever the file holds); ``y`` keeps the labels' dtype. Class names
    come from ``class_names.txt`` in ``folder`` (one per line, blank lines skipped) if present,
    else ``"0"``..``str(C-1)`` with ``C`` the largest label plus one.

    Raises:
        DataError: ``folder`` is not a folder, a file is missing or not valid IDX.
    """
    base = Path(folder)
    if not base.is_dir():
        raise DataError(f"IDX data folder {str(base)!r} does not exist or is not a folder")
    arrays = {key: read_idx(_find(base, stem)) for key, stem in IDX_FILES.items()}
    names_file = base / IDX_CLASS_NAMES_FILE
    class_names = _read_class_names(names_file) if names_file.is_file() else None
    return _raw_dataset(arrays, class_names=class_names, source=source)


def read_fashion_mnist() -> Dataset:
    """Fashion-MNIST (60,000 train / 10,000 test 28x28 uint8 images) from :data:`FASHION_MNIST_DIR`.

    Returns an unvalidated :class:`Dataset` with uint8 ``X`` of shape ``(n, 28, 28)`` and the ten
    class names of :data:`FASHION_MNIST_CLASSES`.

    Raises:
        DataError: the files are missing (the message names the Debian package to install and
            the folder looked at) or corrupt.
    """
    folder = Path(FASHION_MNIST_DIR)
    missing = [stem for stem in IDX_FILES.values() if _existing(folder, stem) is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST is not installed: {str(folder)!r} lacks "
            f"{', '.join(f'{stem}[.gz]' for stem in missing)}. Install Debian's package "
            f"'{FASHION_MNIST_PACKAGE}' (sudo apt-get install {FASHION_MNIST_PACKAGE}), "
            f"or pass the IDX files' folder as --data {IDX_PREFIX}DIR"
        )
    arrays = {key: read_idx(_find(folder, stem)) for key, stem in IDX_FILES.items()}
    return _raw_dataset(arrays, class_names=FASHION_MNIST_CLASSES, source=FASHION_MNIST)


def _existing(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` if it is a file, else ``folder/stem.gz`` if that is, else None."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _find(folder: Path, stem: str) -> Path:
    path = _existing(folder, stem)
    if path is None:
        raise DataError(f"IDX data folder {str(folder)!r} has no {stem} or {stem}.gz")
    return path


def _read_class_names(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class names from {str(path)!r}: {exc}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _raw_dataset(
    arrays: dict[tuple[str, str], np.ndarray],
    *,
    class_names: tuple[str, ...] | None,
    source: str,
) -> Dataset:
    for (split, kind), a in arrays.items():
        if kind == "y" and a.dtype.kind not in "iu":
            raise DataError(
                f"{IDX_FILES[split, kind]} holds {a.dtype.name} values; labels must be integers"
            )
    if class_names is None:
        class_names = derived_class_names(arrays["train", "y"], arrays["test", "y"])
    return from_splits(
        {split: arrays[split, "X"] for split in ("train", "test")},
        {split: arrays[split, "y"] for split in ("train", "test")},
        class_names=class_names,
        source=source,
    )
