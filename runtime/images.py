"""Image decoding and encoding with Pillow: 8-bit pixels kept as decoded (uint8) until a tile or
a caller converts them to float32 RGB in [0, 1] (``as_float``), atomic writes.

Errors are ``ImageError`` with a one-line reason. Decompression bombs and images above
``max_pixels`` are refused before their pixels are decoded. ``read_image_full`` also keeps what
a restored file should carry over: the alpha channel, the bit depth, the ICC profile and EXIF
(with the orientation reset, since the pixels are already turned upright).
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mordasr.errors import ImageError, ImageTooLarge
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.jpeg import MAX_SIDE as JPEG_MAX_SIDE
from mordasr.runtime.jpeg import JpegWriter
from mordasr.runtime.png import PngWriter, decode_png16, is_png16_color_data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
DEFAULT_MAX_PIXELS = 64_000_000
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
MAX_SIDE = {"JPEG": JPEG_MAX_SIDE, "WEBP": 16383}  # the formats' own limits; the others take any size


def _colour_pixels(img: Image.Image) -> np.ndarray:
    """Colour channels (H, W, 3): uint8 as decoded for 8-bit modes (3 bytes a pixel, where float
    would take 12: a large photograph stays small until its tiles are converted), float32 in
    [0, 1] for 16-bit and float modes. Transparent modes give straight colour."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / (65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0)
        return np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=-1)
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(arr[..., None], 3, axis=-1)
    if _has_alpha(img):
        return np.asarray(img.convert("RGBA"))[..., :3]
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))


def as_float(image: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: uint8 pixels divided by 255 (the same rounding wherever an image is
    converted, whole or a tile at a time), floats as they are."""
    if image.dtype == np.uint8:
        out = image.astype(np.float32)
        out /= 255.0
        return out
    return np.asarray(image, dtype=np.float32)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight-alpha colour (..., 3) composited over white; ``alpha`` (...) in [0, 1]."""
    a = alpha[..., None]
    return rgb * a + (1.0 - a)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) straight (not premultiplied) colour: uint8, or float32 in [0, 1] (16-bit)
    alpha: np.ndarray | None  # float32 (H, W) in [0, 1], or None
    bit_depth: int  # 8 or 16 (per channel, of the source)
    icc_profile: bytes | None
    exif: bytes | None  # orientation reset to 1
    frames: int  # > 1 for animations: only the first frame is restored

    @property
    def rgb(self) -> np.ndarray:
        """float32 (H, W, 3) in [0, 1] (a new array for 8-bit sources)."""
        return as_float(self.pixels)

    def composited(self) -> np.ndarray:
        """RGB over white (what the network sees when alpha is not kept separately): the decoded
        pixels themselves when there is no alpha (uint8 for 8-bit sources; ``Restorer`` takes
        them as they are), float32 in [0, 1] otherwise."""
        if self.alpha is None:
            return self.pixels
        return over_white(self.rgb, self.alpha)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to float32 (H, W, 3) in [0, 1], honouring EXIF orientation.

    Transparent images are composited over white; ``read_image_full`` keeps the alpha instead.
    """
    return as_float(read_image_full(path, max_pixels).composited())


def read_image_full(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an image file with its alpha, bit depth, ICC profile and EXIF."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(f"{path}: unreadable ({err.strerror or err})") from None
    return decode_image(data, str(path), max_pixels)


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode encoded image bytes (a file's content, a request body); ``name`` labels errors."""
    if not data:
        raise ImageError(f"{name}: empty (0 bytes), not an image")
    if is_png16_color_data(data):
        decoded = _decode_png16(data, name, max_pixels)
    else:
        decoded = _decode_pillow(data, name, max_pixels)
    if decoded.pixels.dtype != np.uint8 and not np.isfinite(decoded.pixels).all():
        raise ImageError(f"{name}: image holds non-finite values")
    return decoded


def _decode_pillow(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(f"{name}: {width}x{height} exceeds the limit of {max_pixels} pixels")
                if width < 1 or height < 1:
                    raise ImageError(f"{name}: empty image")
                frames = getattr(img, "n_frames", 1)
                img.load()
                exif = img.getexif()
                ImageOps.exif_transpose(img, in_place=True)  # a copy of a large photograph saved
                alpha = (np.asarray(img.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
                         if _has_alpha(img) else None)
                if exif:
                    exif[0x0112] = 1  # orientation: the pixels are upright now
                return DecodedImage(_colour_pixels(img), alpha,
                                    16 if img.mode.startswith("I;16") or img.mode == "I" else 8,
                                    img.info.get("icc_profile"), exif.tobytes() if exif else None, frames)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{name}: declared size is too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None


def _decode_png16(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    width, height = struct.unpack(">II", data[16:24])
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} exceeds the limit of {max_pixels} pixels")
    try:
        pixels, icc = decode_png16(data)
    except (ValueError, zlib.error, struct.error) as err:
        raise ImageError(f"{name}: corrupt or truncated image ({err})") from None
    values = pixels.astype(np.float32) / 65535.0
    alpha = values[..., 3] if values.shape[-1] == 4 else None
    return DecodedImage(np.ascontiguousarray(values[..., :3]), alpha, 16, icc, None, 1)


ROWS_PER_BAND = 256  # rows converted at once: full-size images need no full-size float temporaries
BAND_BYTES = 16 << 20  # and at most this many bytes of them, for very wide images


def _bands(image: np.ndarray) -> range:
    """Starts of the row bands ``quantize`` and ``all_finite`` take at once."""
    row_bytes = max(1, image[:1].size * image.itemsize)
    return range(0, len(image), max(1, min(ROWS_PER_BAND, BAND_BYTES // row_bytes)))


def quantize(image: np.ndarray, dtype: type = np.uint8) -> np.ndarray:
    """Float in [0, 1] -> ``dtype`` (uint8 or uint16), rounded half up, a band of rows at a time
    (any layout, including strided views)."""
    top = float(np.iinfo(dtype).max)
    out = np.empty(image.shape, dtype=dtype)
    bands = _bands(image)
    for start in bands:
        band = np.clip(image[start:start + bands.step], 0.0, 1.0)
        band *= top
        band += 0.5
        out[start:start + bands.step] = band  # truncates, as astype does
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float in [0, 1] -> uint8, rounded half up."""
    return quantize(image, np.uint8)


def all_finite(image: np.ndarray) -> bool:
    """No NaN or inf, checked a band of rows at a time."""
    bands = _bands(image)
    return all(np.isfinite(image[start:start + bands.step]).all() for start in bands)


NON_FINITE = "refusing to write an image with NaN or inf values"
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
ICC_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF")
EXIF_FORMATS = ("PNG", "JPEG", "WEBP")


def write_image(path: str | Path, image: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8,
                icc_profile: bytes | None = None, exif: bytes | None = None) -> Path:
    """Write float (H, W, 3) in [0, 1] atomically (temporary file, then rename), in the format
    of the path's suffix (see ``encode_image``)."""
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unsupported output format (use one of {', '.join(OUTPUT_FORMATS)})")
    try:
        data = encode_image(image, fmt, alpha, bit_depth, icc_profile, exif)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from None
    return atomic_write(path, data)


def check_output_size(fmt: str, width: int, height: int) -> None:
    """Refuse an output size the format cannot hold, before anything is restored."""
    side = MAX_SIDE.get(fmt)
    if side is not None and max(width, height) > side:
        raise ImageError(f"a {width}x{height} image is too large for {fmt} (at most {side} pixels a "
                         "side); write PNG or TIFF instead")


def encode_image(image: np.ndarray, fmt: str = "PNG", alpha: np.ndarray | None = None, bit_depth: int = 8,
                 icc_profile: bytes | None = None, exif: bytes | None = None) -> bytes:
    """Encode float (H, W, 3) in [0, 1] as ``fmt`` (a Pillow format name: PNG, JPEG, ...).

    ``alpha`` (H, W) is kept where the format has an alpha channel (PNG, WebP, TIFF) and
    composited over white elsewhere; ``bit_depth=16`` writes 16-bit PNG (other formats stay
    8-bit); the ICC profile and EXIF are kept where the format allows.
    """
    if fmt not in OUTPUT_FORMATS.values():
        known = ", ".join(sorted(set(OUTPUT_FORMATS.values())))
        raise ImageError(f"unsupported output format {fmt!r} (use one of {known})")
    if alpha is not None and fmt not in ALPHA_FORMATS:
        image = over_white(image, alpha)
        alpha = None
    channels = image if alpha is None else np.concatenate([image, alpha[..., None]], axis=-1)
    buffer = io.BytesIO()
    height, width, depth = channels.shape
    write_bands(buffer, fmt, [channels], width, height, depth, bit_depth, icc_profile, exif)
    return buffer.getvalue()


class _PillowWriter:
    """Rows collected as the 8-bit image (3 or 4 bytes a pixel, never a float one) that Pillow
    then encodes whole: WebP, TIFF and BMP, whose encoders take a whole image."""

    def __init__(self, stream: BinaryIO, fmt: str, width: int, height: int, channels: int,
                 icc_profile: bytes | None, exif: bytes | None):
        self.stream, self.fmt, self.rows = stream, fmt, 0
        self.pixels = np.empty((height, width, channels), np.uint8)
        self.options: dict = {}
        if icc_profile and fmt in ICC_FORMATS:
            self.options["icc_profile"] = icc_profile
        if exif and fmt in EXIF_FORMATS:
            self.options["exif"] = exif

    def write(self, rows: np.ndarray) -> None:
        if self.rows + len(rows) > len(self.pixels):
            raise ValueError(f"more rows than the {len(self.pixels)} the image was opened for")
        self.pixels[self.rows:self.rows + len(rows)] = rows
        self.rows += len(rows)

    def close(self) -> None:
        if self.rows != len(self.pixels):
            raise ValueError(f"{self.rows} rows written of the {len(self.pixels)}")
        Image.fromarray(self.pixels).save(self.stream, format=self.fmt, **self.options)


def write_bands(stream: BinaryIO, fmt: str, bands: Iterable[np.ndarray], width: int, height: int,
                channels: int = 3, bit_depth: int = 8, icc_profile: bytes | None = None,
                exif: bytes | None = None) -> None:
    """Float (rows, W, C) bands in [0, 1], top to bottom, as one image file in ``fmt``: each band
    checked for NaN and rounded before the next is asked for. PNG and JPEG are compressed band
    by band, so nothing of the output's size is held;
    the other formats collect the 8-bit image for Pillow. ``encode_image`` writes a whole image
    as one band and ``mordasr-run`` a tiled restore as its rows finish, so the bytes are the same
    either way. Only PNG has 16 bits (``bit_depth``) and only PNG, WebP and TIFF an alpha
    channel (``channels`` 4)."""
    writer: PngWriter | JpegWriter | _PillowWriter
    check_output_size(fmt, width, height)
    if fmt == "PNG":
        writer = PngWriter(stream, width, height, channels, bit_depth, icc_profile, exif)
    elif channels not in (3, 4) or (channels == 4 and fmt not in ALPHA_FORMATS):
        raise ValueError(f"{fmt} is not written with {channels} channels")
    elif fmt == "JPEG":
        writer, bit_depth = JpegWriter(stream, width, height, icc_profile, exif), 8
    else:
        writer, bit_depth = _PillowWriter(stream, fmt, width, height, channels, icc_profile, exif), 8
    for rows in bands:
        if not all_finite(rows):
            raise ImageError(NON_FINITE)
        writer.write(quantize(rows, np.uint16 if bit_depth == 16 else np.uint8))
    writer.close()


def upscale_alpha(alpha: np.ndarray, width: int, height: int) -> np.ndarray:
    """The alpha channel upscaled on its own (bicubic), clipped to [0, 1]."""
    return Upsampled(alpha[..., None], width, height).alpha_rows(0, height)


class Upsampled:
    """Rows of an image (uint8 or float, any channels) upsampled to ``width`` x ``height`` with
    Pillow's bicubic filter, made on request from only the input rows they need: Pillow clamps its
    filter at the image's edges, not at the box it is given, so the rows equal those of the whole
    image's resize bit for bit (``resize``). A colour fix's reference and a kept alpha channel are
    made so a band at a time, never whole."""

    MARGIN = 4  # input rows beyond the box: bicubic upsampling reaches 2

    def __init__(self, image: np.ndarray, width: int, height: int):
        if height < image.shape[0] or width < image.shape[1]:
            raise ValueError(f"Upsampled only enlarges, not {image.shape[1]}x{image.shape[0]} -> {width}x{height}")
        self.image, self.width, self.height = image, width, height
        self.scale_y = image.shape[0] / height

    def rows(self, start: int, stop: int) -> np.ndarray:
        h, w = self.image.shape[:2]
        top = max(0, math.floor(start * self.scale_y) - self.MARGIN)
        bottom = min(h, math.ceil(stop * self.scale_y) + self.MARGIN)
        box = (0.0, start * self.scale_y - top, float(w), stop * self.scale_y - top)
        part = as_float(self.image[top:bottom])  # 8-bit stays uint8 until a band needs it
        channels = [np.asarray(Image.fromarray(np.ascontiguousarray(part[..., c]), mode="F")
                               .resize((self.width, stop - start), Image.BICUBIC, box=box))
                    for c in range(part.shape[-1])]
        return np.stack(channels, axis=-1)

    def alpha_rows(self, start: int, stop: int) -> np.ndarray:
        """(rows, W) of a one-channel image, clipped to [0, 1]."""
        return np.clip(self.rows(start, stop)[..., 0], 0.0, 1.0)


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased bicubic resize of float (H, W, C) through Pillow's float mode, per channel."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                           .resize((width, height), Image.BICUBIC)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32)
