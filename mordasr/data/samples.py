"""Real photographs that ship with scikit-image, split into training and held-out images.

No download: every image here is stored inside the installed scikit-image package.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# skimage.data.cat() is the same photograph as chelsea(), so it is left out of both splits.
TRAIN_IMAGES = ("camera", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "coins", "moon", "page", "text", "stereo_motorcycle", "brick", "grass", "gravel",
                "clock", "cell", "colorwheel", "retina")
HELDOUT_IMAGES = ("astronaut", "chelsea")


@lru_cache(maxsize=None)
def load_sample_image(name: str) -> np.ndarray:
    """One scikit-image sample as float32 RGB (H, W, 3) in [0, 1]."""
    import skimage.data

    if not hasattr(skimage.data, name):
        raise ValueError(f"unknown scikit-image sample {name!r}")
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    image = image.astype(np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.shape[-1] == 4:
        image = image[..., :3] * image[..., 3:] + (1 - image[..., 3:])
    return np.ascontiguousarray(image)


def sample_images(split: str) -> list[np.ndarray]:
    names = {"train": TRAIN_IMAGES, "heldout": HELDOUT_IMAGES}.get(split)
    if names is None:
        raise ValueError("split must be 'train' or 'heldout'")
    return [load_sample_image(n) for n in names]


class CropSampler:
    """Random square crops with random flips from a list of images, reproducible by seed."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int = 0) -> None:
        usable = [im for im in images if min(im.shape[:2]) >= crop]
        if not usable:
            raise ValueError(f"no image is at least {crop}x{crop} pixels")
        self.images = usable
        self.crop = crop
        self.rng = np.random.default_rng(seed)
        # Sample images in proportion to their area, so big photographs are not under-used.
        areas = np.array([im.shape[0] * im.shape[1] for im in usable], dtype=np.float64)
        self.weights = areas / areas.sum()

    def sample(self, batch: int) -> np.ndarray:
        out = np.empty((batch, self.crop, self.crop, 3), dtype=np.float32)
        for i in range(batch):
            im = self.images[self.rng.choice(len(self.images), p=self.weights)]
            y = self.rng.integers(0, im.shape[0] - self.crop + 1)
            x = self.rng.integers(0, im.shape[1] - self.crop + 1)
            patch = im[y:y + self.crop, x:x + self.crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch[::-1]
            out[i] = patch
        return out


def training_images(folder: str | None, crop: int, seed: int = 0) -> CropSampler:
    """Crop sampler over a folder of HR photographs (recursive), or scikit-image's photographs."""
    if folder:
        from mordasr.data.folders import HRFolder

        return HRFolder(folder, crop, seed)
    return CropSampler(sample_images("train"), crop, seed)
