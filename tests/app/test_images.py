"""app/images.py without a server: PNG encoding of data points, decoding of uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.images import MIN_IMAGE_SIDE, UploadError, decode_upload, png_bytes

LIMIT = 1 << 20


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_png_bytes_shapes() -> None:
    rng = np.random.default_rng(1)
    cases = {(8, 8): "L", (4, 6, 1): "L", (5, 5, 3): "RGB", (3, 3, 4): "RGBA", (16,): "L", (10,): "L"}
    for shape, mode in cases.items():
        with Image.open(io.BytesIO(png_bytes(rng.uniform(size=shape)))) as im:
            assert im.mode == mode, shape
            assert min(im.size) >= MIN_IMAGE_SIDE, shape
    # values outside [0, 1] are min-max scaled instead of clipped flat
    with Image.open(io.BytesIO(png_bytes(np.array([[-2.0, 2.0]])))) as im:
        assert np.asarray(im).min() == 0 and np.asarray(im).max() == 255


@pytest.mark.parametrize("shape", [(8, 8), (6, 10, 1), (5, 7, 3), (4, 4, 4), (36,)])
def test_png_round_trip_recovers_the_input(shape: tuple[int, ...]) -> None:
    """What the API serves, uploaded back, is the same input to 1/255 for every layout."""
    x = np.rint(np.random.default_rng(2).uniform(size=shape) * 255) / 255
    back = decode_upload(png_bytes(x), input_shape=shape, value_range=(0.0, 1.0), max_bytes=LIMIT)
    assert back.shape == shape and back.dtype == np.float64
    np.testing.assert_allclose(back, x, atol=1e-12)


def test_decode_maps_pixels_onto_the_value_range_and_inverts() -> None:
    data = _png(Image.fromarray(np.array([[0, 255], [51, 102]], dtype=np.uint8)))
    x = decode_upload(data, input_shape=(2, 2), value_range=(-1.0, 3.0), max_bytes=LIMIT)
    np.testing.assert_allclose(x, [[-1.0, 3.0], [-0.2, 0.6]])
    inv = decode_upload(data, input_shape=(2, 2), value_range=(0.0, 1.0), max_bytes=LIMIT, invert=True)
    np.testing.assert_allclose(inv, [[1.0, 0.0], [0.8, 0.6]])


def test_decode_resizes_by_area_and_converts_channels() -> None:
    big = np.zeros((40, 40, 3), dtype=np.uint8)
    big[:20] = (255, 255, 255)  # top half white
    x = decode_upload(_png(Image.fromarray(big)), input_shape=(4, 4), value_range=(0.0, 1.0),
                      max_bytes=LIMIT)
    np.testing.assert_allclose(x, np.repeat([[1.0], [1.0], [0.0], [0.0]], 4, axis=1))
    gray = decode_upload(_png(Image.new("L", (3, 3), 128)), input_shape=(6, 6, 3),
                         value_range=(0.0, 1.0), max_bytes=LIMIT)
    assert gray.shape == (6, 6, 3)
    np.testing.assert_allclose(gray, 128 / 255)


@pytest.mark.parametrize("data, shape, status", [
    (b"", (8, 8), 400),
    (b"GIF89a not really", (8, 8), 415),
    (b"x" * (LIMIT + 1), (8, 8), 413),
    (None, (6,), 422),  # flat inputs that are not a square image
])
def test_decode_refuses(data: bytes | None, shape: tuple[int, ...], status: int) -> None:
    payload = data if data is not None else _png(Image.new("L", (4, 4)))
    with pytest.raises(UploadError) as err:
        decode_upload(payload, input_shape=shape, value_range=(0.0, 1.0), max_bytes=LIMIT)
    assert err.value.status == status and err.value.detail
