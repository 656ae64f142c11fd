"""Image decoding and encoding with Pillow: float32 RGB in [0, 1], atomic writes.

Errors are ``ImageError`` with a one-line reason. Decompression bombs and images above
``max_pixels`` are refused before their pixels are decoded.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mordasr.errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
DEFAULT_MAX_PIXELS = 64_000_000
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / (65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0)
        return np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=-1)
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(arr[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite over white; alpha is not restored by this runtime yet.
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an image file to float32 (H, W, 3) in [0, 1], honouring EXIF orientation."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"{path}: {width}x{height} exceeds the limit of {max_pixels} pixels")
                if width < 1 or height < 1:
                    raise ImageError(f"{path}: empty image")
                img.load()
                img = ImageOps.exif_transpose(img)
                array = _to_float_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: declared size is too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"{path}: corrupt or truncated image ({err})") from None
    if not np.isfinite(array).all():
        raise ImageError(f"{path}: image holds non-finite values")
    return array


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write float (H, W, 3) in [0, 1] as 8-bit; atomically (temporary file, then rename)."""
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ImageError(f"{path}: unsupported output format (use one of {', '.join(OUTPUT_FORMATS)})")
    if not np.isfinite(image).all():
        raise ImageError(f"{path}: refusing to write an image with NaN or inf values")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(to_uint8(image)).save(f, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased bicubic resize of float (H, W, 3) through Pillow's float mode, per channel."""
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                           .resize((width, height), Image.BICUBIC)) for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1).astype(np.float32)
