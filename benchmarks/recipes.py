"""Named, seeded degradation recipes: how an HR photograph becomes the LR input of an evaluation.

Every recipe is data in ``RECIPES``; ``mordasr-eval --help`` lists them. An LR image depends only
on the HR image, the recipe and the image's name (the seed is derived from both), so every run,
target and machine scores the same inputs.

- ``bicubic-x4``: crop to a multiple of 4, bicubic x1/4 (antialiased, as MATLAB's ``imresize``
  that the standard SR benchmarks use), 8-bit.
- ``mixed-x4``: Gaussian blur sigma 1.2 (HR pixels) -> bicubic x1/4 -> Gaussian noise sigma 5/255
  -> JPEG quality 70.
- ``realesrgan-x4``: Real-ESRGAN's second-order chain with its default ranges, seeded per image.
- ``noise-N``, ``blur-S``, ``jpeg-Q``: one degradation at one severity on top of bicubic x1/4,
  the per-severity grid of ``mordasr-bench``'s adapter comparison.
- ``blur-1.5+noise-10``, ``noise-10+jpeg-60``, ``blur-1.5+jpeg-60``: mixtures of two (the MoR
  study's ``mixture of two`` family).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SCALE = 4


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    blur_sigma: float = 0.0  # Gaussian blur on HR, in HR pixels
    noise_sigma: float = 0.0  # Gaussian noise on LR, [0, 1] scale
    jpeg_quality: int | None = None
    realesrgan: bool = False
    seed: int = 0

    def degrade(self, hr: np.ndarray, image_name: str, scale: int = SCALE) -> np.ndarray:
        """LR float32 (h, w, 3) in [0, 1] from an HR image whose sides are multiples of ``scale``."""
        if hr.shape[0] % scale or hr.shape[1] % scale:
            raise ValueError(f"HR sides {hr.shape[:2]} are not multiples of {scale}: crop with mod_crop first")
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{self.name}/{image_name}".encode())])
        if self.realesrgan:
            import torch

            from mordasr.data.realesrgan import RealESRGANConfig, degrade_realesrgan

            x = torch.from_numpy(np.ascontiguousarray(hr.transpose(2, 0, 1)[None], dtype=np.float32))
            return degrade_realesrgan(x, scale, RealESRGANConfig(), rng)[0].numpy().transpose(1, 2, 0).copy()
        from mordasr.data.degradations import Degradation, degrade

        return degrade(hr, Degradation(self.blur_sigma, self.noise_sigma, self.jpeg_quality), scale, rng)


def _recipes() -> dict[str, Recipe]:
    table = [
        Recipe("bicubic-x4", "bicubic x1/4 (the standard benchmarks)"),
        Recipe("mixed-x4", "blur 1.2 -> bicubic x1/4 -> noise 5/255 -> JPEG q70", 1.2, 5 / 255, 70),
        Recipe("realesrgan-x4", "Real-ESRGAN second-order chain, default ranges, seeded per image",
               realesrgan=True),
    ]
    table += [Recipe(f"noise-{n}", f"bicubic x1/4 + Gaussian noise {n}/255", noise_sigma=n / 255)
              for n in (0, 5, 10, 20)]
    table += [Recipe(f"blur-{s}", f"blur {s} -> bicubic x1/4", blur_sigma=s) for s in (0.5, 1.5, 2.5)]
    table += [Recipe(f"jpeg-{q}", f"bicubic x1/4 + JPEG q{q}", jpeg_quality=q) for q in (30, 60, 90)]
    table += [Recipe("blur-1.5+noise-10", "blur 1.5 -> bicubic x1/4 -> noise 10/255", blur_sigma=1.5,
                     noise_sigma=10 / 255),
              Recipe("noise-10+jpeg-60", "bicubic x1/4 -> noise 10/255 -> JPEG q60", noise_sigma=10 / 255,
                     jpeg_quality=60),
              Recipe("blur-1.5+jpeg-60", "blur 1.5 -> bicubic x1/4 -> JPEG q60", blur_sigma=1.5, jpeg_quality=60)]
    return {r.name: r for r in table}


RECIPES = _recipes()
STANDARD = ("bicubic-x4", "mixed-x4", "realesrgan-x4")
MIXTURES = ("blur-1.5+noise-10", "noise-10+jpeg-60", "blur-1.5+jpeg-60")
SEVERITIES = tuple(name for name in RECIPES if name not in STANDARD + MIXTURES)


def mod_crop(image: np.ndarray, multiple: int = SCALE) -> np.ndarray:
    """Crop the bottom/right so both sides are multiples of ``multiple`` (the benchmarks' modcrop)."""
    h, w = image.shape[0] // multiple * multiple, image.shape[1] // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"image {image.shape[:2]} is smaller than {multiple} pixels")
    return image[:h, :w]


def recipe_help() -> str:
    return "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values())
