"""Colour correction of a restored image toward its input, as OSEDiff offers (numpy only), a band
of rows at a time.

- ``adain``: per-channel mean and standard deviation of the output matched to the reference's.
- ``wavelet``: the output keeps its high frequencies and takes the reference's low frequencies,
  from an a-trous decomposition with a 3x3 binomial kernel dilated 1, 2, 4, 8, 16 and edges
  replicated (OSEDiff's wavelet_color_fix).

The reference is the input upsampled to the output's size (bicubic), made a band of rows at a
time: neither it nor the corrected image is ever whole in memory, so ``mordasr-run`` streams a
colour-fixed PNG or JPEG as it streams a plain one. The wavelet fix is local: the decomposition's
low-pass reaches 1 + 2 + 4 + 8 + 16 = 31 rows, so a band is exact given 31 rows of context on
each side. AdaIN needs the whole output's statistics before its first row can be corrected: a
streamed output is kept in an unnamed temporary file between the two passes. Whole images go
through the same code, so a file is the same byte for byte either way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from mordasr.runtime.images import Upsampled

COLOR_FIXES = ("none", "adain", "wavelet")
_LEVELS = 5
HALO = sum(2 ** level for level in range(_LEVELS))  # rows of context the low-pass reaches: 31
SLAB_ROWS = 128  # rows corrected at once (plus the halo on each side)
EPS = 1e-5


def _binomial(image: np.ndarray, dilation: int, axis: int) -> np.ndarray:
    """[1, 2, 1] / 4 along ``axis`` with holes of ``dilation``, edges replicated."""
    n = image.shape[axis]
    index = np.arange(n)
    before = np.take(image, np.maximum(index - dilation, 0), axis=axis)
    after = np.take(image, np.minimum(index + dilation, n - 1), axis=axis)
    before += after
    before += 2.0 * image
    before *= 0.25
    return before


def lowpass(image: np.ndarray) -> np.ndarray:
    """The a-trous decomposition's coarsest level: five dilated binomial blurs in turn. The 3x3
    kernel is the outer product of [1, 2, 1] / 4 with itself and replicating the edge commutes
    with that split, so each blur is two 1-D passes."""
    low = image
    for level in range(_LEVELS):
        low = _binomial(_binomial(low, 2 ** level, axis=0), 2 ** level, axis=1)
    return low


def _wavelet(bands: Iterable[np.ndarray], reference: Upsampled) -> Iterator[np.ndarray]:
    height = reference.height
    carry, carry_start, done, end = np.empty((0, reference.width, 3), np.float32), 0, 0, 0
    for band in bands:
        carry = np.concatenate([carry, band]) if len(carry) else band
        end = carry_start + len(carry)
        _check_rows(end, height, more=True)
        ready = height if end == height else end - HALO
        while done < ready:
            stop = min(ready, done + SLAB_ROWS)
            lo, hi = max(0, done - HALO), min(height, stop + HALO)
            output = carry[lo - carry_start:hi - carry_start]
            low = lowpass(reference.rows(lo, hi) - output)  # low(ref) - low(out): the low-pass is linear
            fixed = output[done - lo:stop - lo] + low[done - lo:stop - lo]
            yield np.clip(fixed, 0.0, 1.0, out=fixed)
            done = stop
        keep = max(0, done - HALO)
        carry, carry_start = carry[keep - carry_start:].copy(), keep  # a band is valid only until the next
    _check_rows(end, height)


def _check_rows(rows: int, height: int, more: bool = False) -> None:
    if rows > height or (rows < height and not more):
        raise ValueError(f"the colour fix got {rows} rows of an image {height} rows high")


def _row_moments(rows: np.ndarray) -> np.ndarray:
    """Per row and channel: sum and sum of squares in float64, (rows, 2, C). Row by row, so a
    row's figures do not depend on the band it came in."""
    moments = np.empty((len(rows), 2, rows.shape[-1]), np.float64)
    for i, row in enumerate(rows):
        values = row.astype(np.float64)
        moments[i, 0] = values.sum(axis=0)
        values *= values
        moments[i, 1] = values.sum(axis=0)
    return moments


def _affine(output_moments: list[np.ndarray], reference_moments: list[np.ndarray],
            pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """AdaIN as a per-channel gain and shift (float32): (x - mean_o) / (std_o + eps) * std_r + mean_r."""
    (out_mean, out_std), (ref_mean, ref_std) = (_mean_std(m, pixels) for m in (output_moments, reference_moments))
    gain = ref_std / (out_std + EPS)
    return gain.astype(np.float32), (ref_mean - out_mean * gain).astype(np.float32)


def _mean_std(moments: list[np.ndarray], pixels: int) -> tuple[np.ndarray, np.ndarray]:
    total = np.concatenate(moments).sum(axis=0)  # the same rows summed in the same order, however banded
    mean = total[0] / pixels
    return mean, np.sqrt(np.maximum(total[1] / pixels - mean * mean, 0.0))


class _Spill:
    """Float32 rows kept in an unnamed temporary file and read back ``SLAB_ROWS`` at a time."""

    def __init__(self, width: int) -> None:
        self.file = tempfile.TemporaryFile()
        self.width, self.rows = width, 0

    def keep(self, band: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(band, dtype=np.float32)).cast("B"))  # no copy
        self.rows += len(band)

    def replay(self) -> Iterator[np.ndarray]:
        self.file.seek(0)
        try:
            for start in range(0, self.rows, SLAB_ROWS):
                band = np.empty((min(SLAB_ROWS, self.rows - start), self.width, 3), np.float32)
                self.file.readinto(memoryview(band).cast("B"))
                yield band
        finally:
            self.file.close()


def _adain(bands: Iterable[np.ndarray], reference: Upsampled) -> Iterator[np.ndarray]:
    spill = None if isinstance(bands, Sequence) else _Spill(reference.width)
    moments = []
    for band in bands:
        moments.append(_row_moments(band))
        if spill is not None:
            spill.keep(band)
    _check_rows(sum(len(m) for m in moments), reference.height)
    blocks = (reference.rows(start, min(reference.height, start + SLAB_ROWS))
              for start in range(0, reference.height, SLAB_ROWS))
    gain, shift = _affine(moments, [_row_moments(rows) for rows in blocks],
                          reference.width * reference.height)
    for band in bands if spill is None else spill.replay():
        for start in range(0, len(band), SLAB_ROWS):
            fixed = band[start:start + SLAB_ROWS] * gain
            fixed += shift
            yield np.clip(fixed, 0.0, 1.0, out=fixed)


def color_fix_bands(bands: Iterable[np.ndarray], lr_input: np.ndarray, method: str,
                    width: int, height: int) -> Iterator[np.ndarray]:
    """Float32 output rows (top to bottom, in bands of any height) corrected toward ``lr_input``
    (h, w, 3), clipped to [0, 1], in bands of at most ``SLAB_ROWS`` rows. A sequence of bands is
    read twice by ``adain``; a one-shot iterator (a streamed restore) is kept in a temporary file
    for its second pass (12 bytes per output pixel on disk, none in memory)."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
    if method == "none":
        yield from bands
        return
    reference = Upsampled(lr_input, width, height)
    yield from (_adain(bands, reference) if method == "adain" else _wavelet(bands, reference))


def color_fix(output: np.ndarray, lr_input: np.ndarray, method: str) -> np.ndarray:
    """``output`` (H, W, 3) corrected toward ``lr_input`` (h, w, 3), clipped to [0, 1]."""
    if method == "none":
        return output
    height, width = output.shape[:2]
    fixed = np.empty((height, width, 3), np.float32)
    row = 0
    for rows in color_fix_bands([output], lr_input, method, width, height):
        fixed[row:row + len(rows)] = rows
        row += len(rows)
    return fixed


def adain(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """AdaIN of a whole ``output`` toward a whole ``reference`` of the same size (unclipped)."""
    gain, shift = _affine([_row_moments(output)], [_row_moments(reference)], output.shape[0] * output.shape[1])
    return output * gain + shift


def wavelet(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The wavelet fix of a whole ``output`` toward a whole ``reference`` (unclipped)."""
    return output + lowpass(reference - output)
