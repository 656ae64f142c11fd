"""Buckets: points in degradation-score space that folded bundles ship one graph set for.

Default: k-means over the estimator's scores of synthetically degraded training crops (the
degradations the adapters were trained on). The runtime assigns an image to the nearest centre.
"""

from __future__ import annotations

import numpy as np
import torch

from mordasr.model import OneStepSR
from mordasr.runtime.manifest import Bucket


def calibration_scores(model: OneStepSR, samples: int = 256, crop: int = 128, seed: int = 0) -> np.ndarray:
    """Estimator scores (samples, D) of degraded crops of the training photographs."""
    from mordasr.data.degradations import degraded_batch
    from mordasr.data.samples import CropSampler, sample_images

    rng = np.random.default_rng(seed)
    sampler = CropSampler(sample_images("train"), crop, seed)
    scores = []
    with torch.no_grad():
        for start in range(0, samples, 64):
            hr = sampler.sample(min(64, samples - start))
            lr, _, _ = degraded_batch(hr, model.config.scale, rng)
            scores.append(model.estimate(torch.from_numpy(np.ascontiguousarray(lr.transpose(0, 3, 1, 2)))).numpy())
    return np.concatenate(scores)


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """k-means++ centres (k, D); deterministic for a seed."""
    from scipy.cluster.vq import kmeans2

    if k < 1:
        raise ValueError("the number of buckets must be at least 1")
    if k > len(points):
        raise ValueError(f"{k} buckets need at least {k} calibration samples")
    centres, _ = kmeans2(points.astype(np.float64), k, iter=iterations, minit="++",
                         seed=np.random.default_rng(seed))
    # Order buckets from the mildest to the worst overall degradation, so indices read naturally.
    order = np.argsort(centres.mean(axis=1))
    return centres[order].astype(np.float32)


def label(centre: np.ndarray, names: list[str], threshold: float = 0.5) -> str:
    worse = [n for n, v in zip(names, centre) if v >= threshold and n != "quality"]
    return "+".join(worse) if worse else "mild"


def make_buckets(centres: np.ndarray, names: list[str]) -> list[Bucket]:
    return [Bucket(i, f"b{i}-{label(c, names)}", [round(float(v), 6) for v in c])
            for i, c in enumerate(centres)]


def grid_buckets(k: int, names: list[str]) -> list[Bucket]:
    """``k`` evenly spaced severities along the diagonal (every score equal), mild to severe."""
    if k < 1:
        raise ValueError("the number of buckets must be at least 1")
    levels = (np.arange(k, dtype=np.float32) + 0.5) / k
    return make_buckets(np.repeat(levels[:, None], len(names), axis=1), names)


def default_buckets(model: OneStepSR, k: int, samples: int = 256, seed: int = 0) -> list[Bucket]:
    names = [p[0] for p in model.config.prompts]
    return make_buckets(kmeans(calibration_scores(model, samples, seed=seed), k, seed), names)
