"""Loading a :class:`~engine.data.dataset.Dataset` from the ``--data`` specs of the contract.

- ``"digits"``: scikit-learn's bundled 8x8 digits, split by seed.
- ``"fashion-mnist"``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package.
- ``"idx:DIR"``: the four IDX files of ``DIR`` (see :mod:`engine.data.idx`).
- ``PATH.npz``: arrays ``X_train, y_train, X_test, y_test`` (optional ``class_names``).
- ``PATH/``: an image folder ``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/...``.

Every source then goes the same way (:func:`_finish`): PyTorch-layout images to channels-last,
shape checks, an optional seeded stratified subset, uint8 pixels divided by 255, validation.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path

import numpy as np

from engine.data.dataset import (
    Dataset,
    _check_shapes,
    derived_class_names,
    from_splits,
    validate,
)
from engine.data.idx import FASHION_MNIST, IDX_PREFIX, read_fashion_mnist, read_idx_folder
from engine.data.noise import flip_labels
from engine.data.subset import take_subsets
from engine.errors import DataError

__all__ = [
    "DIGITS",
    "DIGITS_N_TEST",
    "IMAGE_SUFFIXES",
    "NPZ_ARRAYS",
    "channels_last",
    "load_data",
]

DIGITS = "digits"
DIGITS_N_TEST = 500
NPZ_ARRAYS = ("X_train", "y_train", "X_test", "y_test")
NPZ_CLASS_NAMES = "class_names"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# Channel counts recognised on axis 1 of a 4-D array in PyTorch's (n, C, H, W) layout.
NCHW_CHANNELS = frozenset({1, 3, 4})

_GRAY8_MODES = frozenset({"1", "L", "LA"})
_GRAY16_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ACCEPTED = (
    f"'{DIGITS}', '{FASHION_MNIST}', '{IDX_PREFIX}DIR' (IDX files), a .npz file with arrays "
    f"{', '.join(NPZ_ARRAYS)}, or an image folder with train/<class>/ and test/<class>/"
)


def load_data(
    spec: str | os.PathLike[str],
    *,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    label_noise: float = 0.0,
) -> Dataset:
    """Load and validate the data set named by ``spec``, optionally a stratified subset of it.

    Args:
        spec: ``"digits"``, ``"fashion-mnist"``, ``"idx:DIR"``, a path ending in ``.npz``, or a
            folder path.
        seed: the digits train/test split and the subsets' draw.
        train_size: keep a seeded, stratified subset of this many training points (None: all).
        test_size: the same for the test split.
        label_noise: flip this seeded fraction of the (subset's) training labels to another
            class, keeping the loaded ones in ``clean_y_train`` (:func:`engine.data.noise.flip_labels`).

    Returns:
        A validated :class:`Dataset`: float64 ``X`` of shape ``(n, *input_shape)``, int64 ``y``
        of shape ``(n,)``, all arrays read-only and C-contiguous; ``train_index`` /
        ``test_index`` say which rows of the whole splits a subset holds.

    Raises:
        DataError: the spec names nothing loadable, a size is out of range, or the data fails
            :func:`validate`.
    """
    text = os.fspath(spec)
    if not isinstance(text, str):
        raise DataError(f"data spec must be a string or path, got {type(text).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    raw = _read(text, seed=int(seed))
    ds = _finish(raw, seed=int(seed), train_size=train_size, test_size=test_size)
    return flip_labels(ds, float(label_noise), seed=int(seed))


def _read(text: str, *, seed: int) -> Dataset:
    """The unvalidated data set named by ``text`` (``X`` may still be uint8)."""
    if text == DIGITS:
        return _read_digits(seed=seed)
    if text == FASHION_MNIST:
        return read_fashion_mnist()
    if text.startswith(IDX_PREFIX):
        return read_idx_folder(text[len(IDX_PREFIX):], source=text)
    path = Path(text)
    if text.lower().endswith(".npz"):
        if not path.is_file():
            raise DataError(f"no such .npz file: {text!r}")
        return _read_npz(text)
    if path.is_dir():
        return _read_image_folder(text)
    raise DataError(f"cannot load data {text!r}: no such file or folder; expected {_ACCEPTED}")


def _finish(
    raw: Dataset, *, seed: int, train_size: int | None, test_size: int | None
) -> Dataset:
    """Turn a loader's raw data set into a validated one.

    In order: 4-D ``X`` in PyTorch's ``(n, C, H, W)`` layout (``C`` in 1, 3, 4 and the last axis
    not) moved to ``(n, H, W, C)``; shapes checked; the subsets of :func:`take_subsets` taken
    (before scaling, so a small subset of a large uint8 set never becomes float64 whole);
    uint8 ``X`` divided by 255, float ``X`` kept exactly, any other dtype refused;
    :func:`validate`.
    """
    raw = dataclasses.replace(
        raw,
        x_train=channels_last(np.asarray(raw.x_train)),
        x_test=channels_last(np.asarray(raw.x_test)),
    )
    for split in ("train", "test"):
        _check_shapes(split, getattr(raw, f"x_{split}"), np.asarray(getattr(raw, f"y_{split}")))
    raw = take_subsets(raw, seed=seed, train_size=train_size, test_size=test_size)
    return validate(
        dataclasses.replace(
            raw,
            x_train=_scale_features("X_train", raw.x_train),
            x_test=_scale_features("X_test", raw.x_test),
        )
    )


def channels_last(x: np.ndarray) -> np.ndarray:
    """``x`` of shape ``(n, C, H, W)`` with ``C`` in 1, 3, 4 and ``W`` not, as ``(n, H, W, C)``.

    Any other array is returned unchanged (a view; :func:`validate` makes it contiguous).
    """
    if x.ndim == 4 and x.shape[1] in NCHW_CHANNELS and x.shape[-1] not in NCHW_CHANNELS:
        return np.moveaxis(x, 1, -1)  # (n, C, H, W) -> (n, H, W, C)
    return x


def _read_digits(*, seed: int) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, pixels divided by 16 so they lie in [0, 1].

    The split draws ``perm = np.random.default_rng(seed).permutation(1797)``; the test set is
    ``sorted(perm[:500])`` and the training set ``sorted(perm[500:])`` (1,297 points), so within
    each split rows keep the original order of the scikit-learn data. ``X`` has shape
    ``(n, 8, 8)``; class names are ``"0"``..``"9"``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # (1797, 8, 8)
    target = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    perm = np.random.default_rng(int(seed)).permutation(images.shape[0])
    rows = {"test": np.sort(perm[:DIGITS_N_TEST]), "train": np.sort(perm[DIGITS_N_TEST:])}
    return from_splits(
        {split: images[r] for split, r in rows.items()},
        {split: target[r] for split, r in rows.items()},
        class_names=tuple(str(int(c)) for c in bunch.target_names),
        source=DIGITS,
    )


def _read_npz(path: str) -> Dataset:
    """Arrays ``X_train, y_train, X_test, y_test`` (and optional ``class_names``) from ``path``.

    ``X`` is left as stored (:func:`_finish` scales uint8 and refuses dtypes other than float
    and uint8). Labels must be integer-valued in ``0..C-1`` with
    ``C = len(class_names)`` if given, else the largest label over both splits plus one (class
    names are then ``"0"``..``str(C-1)``). Extra arrays are ignored. Nothing is unpickled.
    """
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path!r} as a .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path!r} holds a single array, not a .npz archive of {NPZ_ARRAYS}")
    with archive:
        found = list(archive.files)
        missing = [name for name in NPZ_ARRAYS if name not in found]
        if missing:
            raise DataError(
                f"{path!r} is missing arrays: {', '.join(missing)} "
                f"(found: {', '.join(found) or 'none'})"
            )
        arrays = {name: _read_member(archive, path, name) for name in NPZ_ARRAYS}
        names = _read_member(archive, path, NPZ_CLASS_NAMES) if NPZ_CLASS_NAMES in found else None

    if names is not None:
        class_names = _npz_class_names(names)
    else:
        class_names = derived_class_names(arrays["y_train"], arrays["y_test"])
    return from_splits(
        {split: arrays[f"X_{split}"] for split in ("train", "test")},
        {split: arrays[f"y_{split}"] for split in ("train", "test")},
        class_names=class_names,
        source=path,
    )


def _read_member(archive: np.lib.npyio.NpzFile, path: str, name: str) -> np.ndarray:
    try:
        return np.asarray(archive[name])
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(
            f"array {name!r} in {path!r} cannot be loaded without pickle "
            f"(object arrays are refused): {exc}"
        ) from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"array {name!r} in {path!r} is unreadable: {exc}") from exc


def _scale_features(name: str, x: np.ndarray) -> np.ndarray:
    """Float ``X`` as float64 unchanged; uint8 ``X`` divided by 255; anything else refused."""
    if x.dtype.kind == "f":
        return x.astype(np.float64, copy=False)
    if x.dtype == np.uint8:
        out = x.astype(np.float64, order="C")  # a fresh array, divided in place
        out /= 255.0
        out.setflags(write=False)  # ours alone: validate keeps it instead of copying
        return out
    raise DataError(f"{name} has dtype {x.dtype}; expected a float array or uint8 pixels")


def _npz_class_names(names: np.ndarray) -> tuple[str, ...]:
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DataError(
            f"class_names must be a 1-D array of strings; got dtype {names.dtype}, "
            f"shape {names.shape}"
        )
    if names.dtype.kind == "S":
        try:
            return tuple(bytes(n).decode("utf-8") for n in names)
        except UnicodeDecodeError as exc:
            raise DataError(f"class_names is not valid UTF-8: {exc}") from exc
    return tuple(str(n) for n in names)


def _read_image_folder(root: str) -> Dataset:
    """Images from ``root/train/<class>/`` and ``root/test/<class>/``.

    Class names are the sorted subfolder names of ``train/`` (names starting with ``.`` are
    skipped); a class folder in ``test/`` that is not in ``train/`` is an error. Files with a
    ``.png``, ``.jpg`` or ``.jpeg`` suffix (any case) are read, other files ignored. Within each
    split, row ``i`` is the ``i``-th file in string order of its relative path
    ``"<class>/<file name>"``. If every image is grayscale, ``X`` has shape ``(n, H, W)``;
    otherwise all are converted to RGB, shape ``(n, H, W, 3)``. 8-bit pixels are divided by 255,
    16-bit grayscale pixels by 65535. All images must have one size.
    """
    base = Path(root)
    split_dirs = {split: base / split for split in ("train", "test")}
    for split, folder in split_dirs.items():
        if not folder.is_dir():
            raise DataError(
                f"image folder {root!r} has no {split}/ subfolder; expected {_ACCEPTED}"
            )
    class_names = tuple(sorted(_class_dirs(split_dirs["train"])))
    unknown = sorted(set(_class_dirs(split_dirs["test"])) - set(class_names))
    if unknown:
        raise DataError(
            f"test class {unknown[0]!r} in {root!r} has no folder in train/ "
            f"(train classes: {', '.join(class_names) or 'none'})"
        )
    index = {name: k for k, name in enumerate(class_names)}
    files = {
        split: _image_files(folder, root=root, split=split) for split, folder in split_dirs.items()
    }

    reference: tuple[Path, tuple[int, int]] | None = None
    pixels: dict[str, list[np.ndarray]] = {}
    for split in ("train", "test"):
        pixels[split] = []
        for rel in files[split]:
            file = split_dirs[split] / rel
            image, size = _read_image(file)
            if reference is None:
                reference = (file, size)
            elif size != reference[1]:
                raise DataError(
                    f"image {str(file)!r} is {size[0]}x{size[1]} (WxH) but "
                    f"{str(reference[0])!r} is {reference[1][0]}x{reference[1][1]}; "
                    "all images must have one size"
                )
            pixels[split].append(image)

    color = any(a.ndim == 3 for split in pixels for a in pixels[split])
    xs = {split: _stack(pixels[split], color=color) for split in pixels}
    ys = {
        split: np.array([index[rel.split("/", 1)[0]] for rel in files[split]], dtype=np.int64)
        for split in files
    }
    return from_splits(xs, ys, class_names=class_names, source=root)


def _class_dirs(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _image_files(folder: Path, *, root: str, split: str) -> list[str]:
    """Relative paths ``"<class>/<file>"`` of the images of one split, in string order."""
    rels = [
        f"{cls}/{p.name}"
        for cls in _class_dirs(folder)
        for p in (folder / cls).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rels:
        raise DataError(
            f"{split} split is empty: no .png/.jpg/.jpeg files under "
            f"{str(Path(root) / split)!r}/<class>/"
        )
    return sorted(rels)


def _read_image(file: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels in [0, 1] as float64: ``(H, W)`` for grayscale, ``(H, W, 3)`` otherwise.

    Also returns the size as Pillow gives it, ``(W, H)``.
    """
    from PIL import Image

    try:
        with Image.open(file) as im:
            im.load()
            size = (int(im.width), int(im.height))
            if im.mode in _GRAY8_MODES:
                return np.asarray(im.convert("L"), dtype=np.float64) / 255.0, size
            if im.mode in _GRAY16_MODES:
                raw = np.asarray(im).astype(np.float64)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise DataError(f"image {str(file)!r} has pixel values outside 0..65535")
                return raw / 65535.0, size
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0, size
    except DataError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, zlib.error, ... on bad files
        raise DataError(f"cannot read image {str(file)!r}: {exc}") from exc


def _stack(images: list[np.ndarray], *, color: bool) -> np.ndarray:
    """Stack to ``(n, H, W)``, or ``(n, H, W, 3)`` with grayscale images repeated to RGB."""
    if color:
        images = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in images]
    return np.stack(images)
