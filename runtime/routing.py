"""Bucket choice for folded bundles: the nearest bucket centre in degradation-score space."""

from __future__ import annotations

import numpy as np

BUCKET_RULE = "nearest-euclidean"


def nearest_bucket(scores: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (K, D) for each score vector (N, D)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    centres = np.asarray(centres, dtype=np.float64)
    dist = ((scores[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return dist.argmin(axis=1)
