"""Colour correction of a restored image toward its input, as OSEDiff offers (numpy only).

- ``adain``: per-channel mean and standard deviation of the output matched to the input's.
- ``wavelet``: the output keeps its high frequencies and takes the input's low frequencies, from
  an a-trous decomposition with a 3x3 binomial kernel dilated 1, 2, 4, 8, 16 (OSEDiff's
  wavelet_color_fix).
Both compare against the input upsampled to the output size.
"""

from __future__ import annotations

import numpy as np

from mordasr.runtime.images import resize

COLOR_FIXES = ("none", "adain", "wavelet")
_LEVELS = 5


def adain(output: np.ndarray, reference: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean_o, std_o = output.mean(axis=(0, 1)), output.std(axis=(0, 1))
    mean_r, std_r = reference.mean(axis=(0, 1)), reference.std(axis=(0, 1))
    return (output - mean_o) / (std_o + eps) * std_r + mean_r


def _blur(image: np.ndarray, dilation: int) -> np.ndarray:
    """3x3 binomial blur with holes of ``dilation`` pixels, edges replicated."""
    d = dilation
    padded = np.pad(image, ((d, d), (d, d), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    kernel = {(-1, -1): 1, (-1, 0): 2, (-1, 1): 1, (0, -1): 2, (0, 0): 4, (0, 1): 2,
              (1, -1): 1, (1, 0): 2, (1, 1): 1}
    out = np.zeros_like(image)
    for (dy, dx), weight in kernel.items():
        out += weight * padded[d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]
    return out / 16.0


def _low_high(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    high = np.zeros_like(image)
    low = image
    for level in range(_LEVELS):
        blurred = _blur(low, 2 ** level)
        high += low - blurred
        low = blurred
    return low, high


def wavelet(output: np.ndarray, reference: np.ndarray) -> np.ndarray:
    _, high = _low_high(output)
    low, _ = _low_high(reference)
    return low + high


def color_fix(output: np.ndarray, lr_input: np.ndarray, method: str) -> np.ndarray:
    """``output`` (H, W, 3) corrected toward ``lr_input`` (h, w, 3), clipped to [0, 1]."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
    if method == "none":
        return output
    reference = resize(lr_input, output.shape[1], output.shape[0])
    fixed = adain(output, reference) if method == "adain" else wavelet(output, reference)
    return np.clip(fixed, 0.0, 1.0).astype(np.float32)
