"""What the router sees, and the bucket choice for folded bundles.

The router's view: degradations (noise, JPEG blocks, blur) live at the image's own pixel scale,
and a whole photograph resized to the router's input (64 px for the tiny preset) averages them
away, so a noisy JPEG photo would score as clean. An LR image at least ``size`` px on its short
side is therefore seen through up to four native-resolution ``size`` x ``size`` windows (one
centred per axis, or two at the quarter points when the axis holds two windows), whose scores are
averaged; a smaller image is resized to ``size`` x ``size``, as the estimator's training crops are.
The bucket: the nearest bucket centre in degradation-score space.
"""

from __future__ import annotations

import numpy as np

BUCKET_RULE = "nearest-euclidean"
MAX_WINDOWS = 4  # windows the router scores per image at most (two per axis)


def nearest_bucket(scores: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (K, D) for each score vector (N, D)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    centres = np.asarray(centres, dtype=np.float64)
    dist = ((scores[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return dist.argmin(axis=1)


def _window_starts(length: int, size: int) -> list[int]:
    if length >= 2 * size:
        return [max(0, length // 4 - size // 2), min(length - size, 3 * length // 4 - size // 2)]
    return [(length - size) // 2]


def router_windows(height: int, width: int, size: int) -> list[tuple[int, int]] | None:
    """Top-left corners of the native-resolution ``size`` windows the router scores for an LR image
    (their scores are averaged), or None when the image is smaller than ``size`` on a side and is
    resized to the router input instead."""
    if min(height, width) < size:
        return None
    return [(y, x) for y in _window_starts(height, size) for x in _window_starts(width, size)]
