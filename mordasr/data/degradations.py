"""Synthetic degradations with known parameters: blur -> bicubic downscale -> noise -> JPEG.

The known parameters give the target scores the ``tiny`` preset's degradation estimator is
fitted to (``target_scores``), in the same 7 dimensions as the CLIP prompts. Real-ESRGAN's
second-order pipeline (``mordasr/data/realesrgan.py``) is the paper-fidelity version ``mordasr-train fit`` uses.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from mordasr.runtime.images import to_uint8

MAX_BLUR_SIGMA = 3.0
MAX_NOISE_SIGMA = 25.0 / 255.0
JPEG_QUALITY_RANGE = (30, 95)


@dataclass(frozen=True)
class Degradation:
    blur_sigma: float = 0.0  # Gaussian blur on the HR image, in HR pixels (0: none)
    noise_sigma: float = 0.0  # Gaussian noise std on the LR image, [0, 1] intensity scale
    jpeg_quality: int | None = None  # JPEG quality of the LR image (None: no compression)

    def to_dict(self) -> dict:
        return asdict(self)


def random_degradation(rng: np.random.Generator, p_blur: float = 0.6, p_noise: float = 0.5,
                       p_jpeg: float = 0.5) -> Degradation:
    blur = float(rng.uniform(0.4, MAX_BLUR_SIGMA)) if rng.random() < p_blur else 0.0
    noise = float(rng.uniform(2 / 255, MAX_NOISE_SIGMA)) if rng.random() < p_noise else 0.0
    jpeg = int(rng.integers(*JPEG_QUALITY_RANGE)) if rng.random() < p_jpeg else None
    return Degradation(blur, noise, jpeg)


def degrade(hr: np.ndarray, deg: Degradation, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Low-resolution float32 (h, w, 3) in [0, 1] from an HR float image (H, W, 3)."""
    image = hr
    if deg.blur_sigma > 0:
        image = gaussian_filter(image, sigma=(deg.blur_sigma, deg.blur_sigma, 0), mode="reflect")
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    lr = np.asarray(Image.fromarray(to_uint8(image)).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    if deg.noise_sigma > 0:
        lr = lr + rng.normal(0.0, deg.noise_sigma, lr.shape).astype(np.float32)
    lr = to_uint8(lr)
    if deg.jpeg_quality is not None:
        buffer = io.BytesIO()
        Image.fromarray(lr).save(buffer, format="JPEG", quality=deg.jpeg_quality)
        lr = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return lr.astype(np.float32) / 255


def target_scores(deg: Degradation, scale: int = 4) -> np.ndarray:
    """Scores in [0, 1] for the 7 dimensions (quality, blur, noise, resolution, edges, detail,
    compression), derived from the known degradation parameters. Higher = worse."""
    blur = min(deg.blur_sigma / MAX_BLUR_SIGMA, 1.0)
    noise = min(deg.noise_sigma / MAX_NOISE_SIGMA, 1.0)
    lo, hi = JPEG_QUALITY_RANGE
    compression = (0.0 if deg.jpeg_quality is None
                   else float(np.clip((hi - deg.jpeg_quality) / (hi - lo), 0, 1)) * 0.8 + 0.2)
    resolution = min(1.0, 0.25 + 0.75 * blur)
    edges = min(1.0, 0.7 * blur + 0.3 * compression)
    detail = max(blur, 0.6 * noise, 0.6 * compression)
    quality = 0.5 * max(blur, noise, compression) + 0.5 * (blur + noise + compression) / 3
    return np.array([quality, blur, noise, resolution, edges, detail, compression], dtype=np.float32)


def degraded_batch(hr_batch: np.ndarray, scale: int, rng: np.random.Generator,
                   degradations: list[Degradation] | None = None):
    """Degrade a batch (N, H, W, 3); returns (lr (N, h, w, 3), degradations, target scores (N, 7))."""
    if degradations is None:
        degradations = [random_degradation(rng) for _ in range(len(hr_batch))]
    lr = np.stack([degrade(hr, d, scale, rng) for hr, d in zip(hr_batch, degradations)])
    targets = np.stack([target_scores(d, scale) for d in degradations])
    return lr, degradations, targets


# The kinds of degradation a training batch draws from, one per image: clean bicubic (the standard
# benchmark), the synthetic chain above with each factor present or absent, the same chain with all
# three present ("compound": a camera photo is often blurred, noisy and compressed at once; the
# synthetic kind stacks all three in only 15 % of its draws), and Real-ESRGAN's second-order chain.
_PER_IMAGE_KINDS = {
    "clean": lambda rng: Degradation(),
    "synthetic": random_degradation,
    "compound": lambda rng: random_degradation(rng, p_blur=1.0, p_noise=1.0, p_jpeg=1.0),
}
DEGRADATION_KINDS = (*_PER_IMAGE_KINDS, "realesrgan")  # Real-ESRGAN's chain runs on the whole batch at once

# The adapters' training mix. (The base's sr stage draws from its own: BaseTrainingConfig.sr_mix.)
ADAPTER_MIX = (("clean", 0.25), ("synthetic", 0.45), ("realesrgan", 0.30))


def parse_mix(text: str, option: str = "mix") -> tuple[tuple[str, float], ...]:
    """``clean=0.3,synthetic=0.5,realesrgan=0.2`` as ((kind, probability), ...), normalised to sum to 1."""
    from mordasr.runtime.cli_options import parse_pairs

    shares = parse_pairs(text, option, float, keys=DEGRADATION_KINDS, form="KIND=SHARE")
    if not shares or any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
        raise ValueError(f"{option}: give KIND=SHARE items with shares >= 0 that do not all vanish")
    total = sum(shares.values())
    return tuple((k, v / total) for k, v in shares.items())


def mixed_degraded_batch(hr_batch: np.ndarray, scale: int, rng: np.random.Generator,
                         mix: tuple[tuple[str, float], ...] = ADAPTER_MIX) -> np.ndarray:
    """LR batch (N, h, w, 3) with each image degraded by a kind drawn from ``mix``."""
    import torch

    from mordasr.data.realesrgan import RealESRGANConfig, degrade_realesrgan

    kinds = rng.choice([k for k, _ in mix], size=len(hr_batch), p=[p for _, p in mix])
    lr = np.empty((len(hr_batch), hr_batch.shape[1] // scale, hr_batch.shape[2] // scale, 3), np.float32)
    for i, kind in enumerate(kinds):
        if kind in _PER_IMAGE_KINDS:
            lr[i] = degrade(hr_batch[i], _PER_IMAGE_KINDS[kind](rng), scale, rng)
    real = np.flatnonzero(kinds == "realesrgan")
    if len(real):
        hr = torch.from_numpy(np.ascontiguousarray(hr_batch[real].transpose(0, 3, 1, 2)))
        out = degrade_realesrgan(hr, scale, RealESRGANConfig(), rng)
        lr[real] = out.numpy().transpose(0, 2, 3, 1)
    return lr
