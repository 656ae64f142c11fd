"""Calibration images: degraded low-resolution images, split per degradation bucket.

Default source: random crops of the training photographs shipped with scikit-image, degraded
with random blur / noise / JPEG (the distribution the adapters were trained on). A user folder of
low-resolution images can be given instead. Each bucket calibrates on the images whose router
scores lie nearest to its centre, so every bucket's graphs see the degradations they will run on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import MordasrError
from mordasr.runtime.images import IMAGE_SUFFIXES, read_image


def synthetic_images(count: int, scale: int, crop: int = 128, seed: int = 0) -> list[np.ndarray]:
    from mordasr.data.degradations import degraded_batch
    from mordasr.data.samples import CropSampler, sample_images

    rng = np.random.default_rng(seed)
    hr = CropSampler(sample_images("train"), crop, seed).sample(count)
    lr, _, _ = degraded_batch(hr, scale, rng)
    return list(lr)


def folder_images(folder: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MordasrError(f"calibration folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MordasrError(f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    order = np.random.default_rng(seed).permutation(len(files))
    images, unreadable = [], []
    for i in order:
        if len(images) == count:
            break
        try:
            images.append(read_image(files[i]))
        except MordasrError:
            unreadable.append(files[i].name)
    if not images:
        raise MordasrError(f"calibration folder {folder}: no readable image ({len(unreadable)} unreadable)")
    return images


def split_per_bucket(scores: np.ndarray, centres: np.ndarray, per_bucket: int) -> list[list[int]]:
    """For each bucket, the indices of the ``per_bucket`` images nearest to its centre."""
    dist = ((scores[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return [np.argsort(dist[:, b], kind="stable")[:per_bucket].tolist() for b in range(len(centres))]
