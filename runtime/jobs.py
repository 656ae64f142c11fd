"""One restore job, as every front end runs it: decode -> restore -> colour fix -> alpha -> encode.

``mordasr-run`` (one process or Ray Data workers) and ``mordasr-serve`` call these, so a file
restored by any of them is byte-for-byte the same for the same bundle and options.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from mordasr.errors import ImageError, MordasrError, first_line
from mordasr.runtime.atomic import atomic_open
from mordasr.runtime.color import color_fix as color_fix_image
from mordasr.runtime.color import color_fix_bands
from mordasr.runtime.images import (
    ALPHA_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    DecodedImage,
    Upsampled,
    check_output_size,
    decode_image,
    encode_image,
    over_white,
    read_image_full,
    upscale_alpha,
    write_bands,
)
from mordasr.runtime.pipeline import Progress, Restorer
from mordasr.runtime.tiling import Tiling

T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class RestoreOptions:
    """What ``mordasr-run`` options change about one image's restore."""

    tiling: Tiling = Tiling()
    color_fix: str = "none"  # none | adain | wavelet
    bit_depth: str = "auto"  # auto | 8 | 16
    keep_alpha: bool = True  # False: composite transparent inputs over white
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Restored:
    """A restored image with what its output file carries over from the input."""

    image: np.ndarray | None  # float32 (H*scale, W*scale, 3) in [0, 1], colour-fixed; None: streamed to its file
    alpha: np.ndarray | None
    bit_depth: int
    icc_profile: bytes | None
    exif: bytes | None
    scores: np.ndarray  # the router's degradation scores
    bucket: int | None  # folded bundles: the bucket whose graphs ran
    input_size: tuple[int, int]  # (width, height)
    output_size: tuple[int, int]  # (width, height)
    frames: int

    def encode(self, fmt: str = "PNG") -> bytes:
        if self.image is None:
            raise ValueError("this image was streamed to its file and is not held")
        return encode_image(self.image, fmt, self.alpha, self.bit_depth, self.icc_profile, self.exif)


def restore_decoded(restorer: Restorer, decoded: list[DecodedImage], options: RestoreOptions,
                    on_tile: Progress | None = None) -> list[Restored]:
    """Restore decoded images; several go through ``Restorer.restore_batch`` together."""
    inputs = [_network_input(d, options) for d in decoded]
    results = restorer.restore_batch([image for image, _ in inputs], options.tiling, on_tile)
    restored = []
    for d, (image, alpha), result in zip(decoded, inputs, results):
        fixed = color_fix_image(result.image, image, options.color_fix)
        h, w = fixed.shape[:2]
        restored.append(Restored(fixed, None if alpha is None else upscale_alpha(alpha, w, h), _bit_depth(d, options),
                                 d.icc_profile, d.exif, result.scores, result.bucket,
                                 (image.shape[1], image.shape[0]), (w, h), d.frames))
    return restored


def _network_input(decoded: DecodedImage, options: RestoreOptions) -> tuple[np.ndarray, np.ndarray | None]:
    """(what the network restores, the alpha kept beside it or None): the colour as decoded when
    the alpha is kept, else the image composited over white."""
    if decoded.alpha is not None and options.keep_alpha:
        return decoded.pixels, decoded.alpha
    return decoded.composited(), None


def _bit_depth(decoded: DecodedImage, options: RestoreOptions) -> int:
    return decoded.bit_depth if options.bit_depth == "auto" else int(options.bit_depth)


def restore_file(restorer: Restorer, src: Path, dst: Path, options: RestoreOptions,
                 on_tile: Progress | None = None) -> Restored:
    """Read ``src``, restore it and write ``dst`` atomically in the format of its suffix.

    The output is colour-fixed, given its upscaled alpha and written a band of rows at a time as
    the tiles finish (``Restorer.restore_stream``): a PNG or JPEG is compressed band by band, so
    no array of the output's size is held and memory stays bounded however large the image;
    WebP, TIFF and BMP hold the 8-bit image for Pillow, not a float one. The bytes are the same
    as a whole-image write. An output format or size the format cannot hold is refused before
    anything is restored."""
    fmt = OUTPUT_FORMATS.get(dst.suffix.lower())
    if fmt is None:
        raise ImageError(f"{dst}: unsupported output format (use one of {', '.join(OUTPUT_FORMATS)})")
    decoded = read_image_full(src, max_pixels=options.max_pixels)
    height, width = decoded.pixels.shape[:2]
    try:
        check_output_size(fmt, width * restorer.scale, height * restorer.scale)
        with atomic_open(dst) as file:
            return restore_streamed(restorer, decoded, file, fmt, options, on_tile)
    except ImageError as err:
        raise ImageError(f"{dst}: {err}") from None


def restore_streamed(restorer: Restorer, decoded: DecodedImage, file: BinaryIO, fmt: str, options: RestoreOptions,
                     on_tile: Progress | None = None) -> Restored:
    """Restore ``decoded`` and write it to ``file`` as ``fmt`` a band of rows at a time
    (``restore_file``'s and ``encode_restored``'s path)."""
    image, alpha = _network_input(decoded, options)
    stream = restorer.restore_stream(image, tiling=options.tiling, on_tile=on_tile)
    depth = _bit_depth(decoded, options)
    height, width = stream.size
    bands = color_fix_bands(stream.bands, image, options.color_fix, width, height)
    channels = 3
    if alpha is not None:
        bands = _with_alpha(bands, Upsampled(alpha[..., None], width, height), fmt in ALPHA_FORMATS)
        channels = 4 if fmt in ALPHA_FORMATS else 3
    write_bands(file, fmt, bands, width, height, channels, depth, decoded.icc_profile, decoded.exif)
    return Restored(None, None, depth, decoded.icc_profile, decoded.exif, stream.scores, stream.bucket,
                    (image.shape[1], image.shape[0]), (width, height), decoded.frames)


def _with_alpha(bands: Iterable[np.ndarray], alpha: Upsampled, keep: bool) -> Iterator[np.ndarray]:
    """RGB bands with the upscaled alpha's rows: as a fourth channel, or composited over white
    (formats without alpha), as ``encode_image`` does with a whole image."""
    row = 0
    for rgb in bands:
        a = alpha.alpha_rows(row, row + len(rgb))
        row += len(rgb)
        yield np.concatenate([rgb, a[..., None]], axis=-1) if keep else over_white(rgb, a)


def encode_restored(restorer: Restorer, items: list[tuple[DecodedImage, str]],
                    options: RestoreOptions) -> list[tuple[bytes, Restored]]:
    """Restore and encode decoded images (a server's batch), each as its format (a Pillow format
    name). Images large enough to be tiled are restored and encoded band by band into memory
    (``restore_streamed``), so no float output of theirs is held; the others go through
    ``Restorer.restore_batch`` together. The bytes are ``mordasr-run``'s for the same image."""
    results: dict[int, tuple[bytes, Restored]] = {}
    small = []
    for i, (decoded, fmt) in enumerate(items):
        if restorer.is_tiled(decoded.pixels, options.tiling):
            buffer = io.BytesIO()
            restored = restore_streamed(restorer, decoded, buffer, fmt, options)
            results[i] = (buffer.getvalue(), restored)
        else:
            small.append(i)
    for i, restored in zip(small, restore_decoded(restorer, [items[i][0] for i in small], options)):
        results[i] = (restored.encode(items[i][1]), restored)
    return [results[i] for i in range(len(items))]


def restore_bytes(restorer: Restorer, data: bytes, options: RestoreOptions, fmt: str = "PNG",
                  name: str = "request") -> tuple[bytes, Restored]:
    """Encoded image bytes in, encoded restored image out (``fmt`` a Pillow format name)."""
    ((payload, restored),) = encode_restored(restorer, [(decode_image(data, name, options.max_pixels), fmt)],
                                             options)
    return payload, restored


def each_or_error(restore_many: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """``restore_many(items)``; when it fails, each item alone, so that one bad image of a batch
    fails by itself and the others batched with it still come back."""
    try:
        return restore_many(items)
    except Exception:
        results: list[R | Exception] = []
        for item in items:
            try:
                results.extend(restore_many([item]))
            except Exception as err:
                results.append(err)
        return results


def output_suffix(path: Path) -> str:
    """Keep the input's format where it can be written (GIF inputs become PNG)."""
    return path.suffix if path.suffix.lower() in OUTPUT_FORMATS else ".png"


def plan_jobs(input_path: Path, output: Path, fmt: str | None) -> list[tuple[Path, Path]]:
    """(input, output) file pairs: one for a file; for a folder, every image in it (recursively),
    its relative path kept under ``output``, in the format ``fmt`` or its own."""
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, (output / p.relative_to(input_path)).with_suffix(fmt or output_suffix(p))) for p in files]
    if output.is_dir():
        output = output / (input_path.stem + (fmt or ".png"))
    elif fmt:
        output = output.with_suffix(fmt)
    return [(input_path, output)]


def restore_files(restorer: Restorer, jobs: list[tuple[Path, Path]], options: RestoreOptions,
                  on_result: Callable[[Path, str, str], None], on_tile: Progress | None = None) -> None:
    """Restore each (src, dst) in turn; ``on_result(src, error, line)`` hears of each, and
    ``on_tile(done, total)`` of each tile of a tiled one. A file that fails is reported and the
    run goes on (a long folder should not stop at one bad image)."""
    for src, dst in jobs:
        start = time.perf_counter()
        try:
            restored = restore_file(restorer, src, dst, options, on_tile)
        except Exception as err:
            on_result(src, failure_reason(src, err), "")
        else:
            on_result(src, "", describe(src, dst, restored, restorer.manifest.mode, time.perf_counter() - start))


def failure_reason(src: Path | str, err: Exception) -> str:
    """One line that starts with the file and says why it failed."""
    reason = first_line(err)
    if not isinstance(err, MordasrError):
        reason = f"{src}: {type(err).__name__}: {reason}"
    return reason


def describe(src: Path | str, dst: Path | str, restored: Restored, mode: str, seconds: float) -> str:
    """The line ``mordasr-run`` prints for a restored file."""
    where = f"bucket {restored.bucket}" if restored.bucket is not None else mode
    extra = ", first frame of an animation" if restored.frames > 1 else ""
    (w, h), (out_w, out_h) = restored.input_size, restored.output_size
    return (f"{src} -> {dst} ({w}x{h} -> {out_w}x{out_h}, "
            f"{where}{extra}, {seconds:.2f} s)")
