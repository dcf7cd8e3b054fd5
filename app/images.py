"""Images in and out: encode a data point as PNG, decode an uploaded PNG/JPEG into a data point."""

from __future__ import annotations

import base64
import io
import math
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ACCEPTED_FORMATS", "MAX_UPLOAD_PIXELS", "MIN_IMAGE_SIDE", "UploadError", "decode_upload",
           "png_bytes", "png_data_url"]

MIN_IMAGE_SIDE = 128  # served images are scaled up (nearest neighbour) to at least this short side
MAX_UPLOAD_PIXELS = 25_000_000  # width × height refused above this, before decoding (bombs)
ACCEPTED_FORMATS = ("PNG", "JPEG")
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # the PIL mode of an input with this many channels
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how PIL opens a 16-bit grayscale PNG


class UploadError(ValueError):
    """An upload that cannot become a data point; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def png_bytes(x: np.ndarray, *, min_side: int = MIN_IMAGE_SIDE) -> bytes:
    """Encode one input as PNG: grayscale (H, W), (H, W, 1); LA, RGB or RGBA (H, W, 2..4); a flat
    (d,) input as a square when d is one, else as one row. Values in [0, 1] map to 0..255 (other
    ranges are min-max scaled per image); the image is enlarged by an integer factor, nearest
    neighbour, so that its short side is at least ``min_side`` pixels."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        a = a.reshape(side, side) if side * side == a.size else a.reshape(1, -1)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    a = np.nan_to_num(a)
    lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    pixels = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)  # (H, W[, C])
    factor = max(1, math.ceil(min_side / min(pixels.shape[:2])))
    pixels = np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(x: np.ndarray, *, min_side: int = MIN_IMAGE_SIDE) -> str:
    """:func:`png_bytes` as a ``data:image/png;base64,`` URL, for pages and exports."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(x, min_side=min_side)).decode()


def _target(input_shape: tuple[int, ...]) -> tuple[int, int, str, tuple[int, ...]]:
    """(height, width, PIL mode, final shape) of an image input of this run."""
    if len(input_shape) == 1:
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise UploadError(422, f"this run's inputs are flat vectors of {input_shape[0]} values, "
                                   "not images: an upload cannot be converted to them")
        return side, side, "L", input_shape
    h, w = input_shape[:2]
    channels = input_shape[2] if len(input_shape) == 3 else 1
    if len(input_shape) > 3 or channels not in CHANNEL_MODES:
        raise UploadError(422, f"this run's inputs have shape {tuple(input_shape)}, not an image of "
                               "1 to 4 channels: an upload cannot be converted to them")
    return h, w, CHANNEL_MODES[channels], input_shape


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode``: 16-bit grayscale scaled onto 0..255 (PIL would clip it to white);
    transparent pixels over white (paper) when ``mode`` has no alpha (PIL would drop the alpha
    and show whatever colour they hide, often black)."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)  # (H, W) in 0..65535
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if "A" not in mode and (img.mode in ("LA", "RGBA", "PA") or "transparency" in img.info):
        paper = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, img.convert("RGBA"))
    return img.convert(mode)


def decode_upload(data: bytes, *, input_shape: tuple[int, ...], value_range: tuple[float, float],
                  max_bytes: int, invert: bool = False) -> np.ndarray:
    """An uploaded PNG or JPEG as one data point of shape ``input_shape`` (float64).

    The image is converted to the run's channels (grayscale, RGB, ...), resized to its height
    and width (area averaging when shrinking, bilinear when enlarging), and its 0..255 pixels
    mapped linearly onto ``value_range``, the training inputs' range (``invert`` first flips
    dark and light, for dark-on-light drawings of light-on-dark data). Raises
    :class:`UploadError` with a 4xx status for anything that is not such an image.
    """
    if not data:
        raise UploadError(400, "the uploaded file is empty")
    if len(data) > max_bytes:
        raise UploadError(413, f"the upload is {len(data):,} bytes; the limit is {max_bytes:,}")
    h, w, mode, shape = _target(input_shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ACCEPTED_FORMATS:
                raise UploadError(415, f"unsupported image format {img.format}: upload a PNG or JPEG")
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise UploadError(413, f"the image is {img.width}×{img.height} pixels; the limit is "
                                       f"{MAX_UPLOAD_PIXELS:,} pixels")
            img.load()
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError(415, "the upload is not an image: upload a PNG or JPEG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UploadError(413, f"the image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(400, f"the image could not be decoded (truncated or corrupt: {exc})") from None
    img = _convert(img, mode)
    shrink = img.width >= w and img.height >= h
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    # band by band: PIL premultiplies alpha when resizing LA/RGBA, which would alter the colours
    img = Image.merge(mode, [band.resize((w, h), method) for band in img.split()])
    pixels = np.asarray(img, dtype=np.float64) / 255.0  # (h, w[, c]) in [0, 1]
    if invert:
        pixels = 1.0 - pixels
    lo, hi = value_range
    return (lo + (hi - lo) * pixels).reshape(shape)
