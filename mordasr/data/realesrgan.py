"""Real-ESRGAN's second-order degradation synthesis (Wang et al., 2021), on whatever device the
HR batch lives on.

Per image: blur (isotropic / anisotropic / generalized Gaussian / plateau kernels, or a sinc) ->
random resize (up / down / keep; area, bilinear or bicubic) -> Gaussian or Poisson noise (colour or
gray) -> JPEG; then the same again with the second-stage ranges (the blur only with
``second_blur_prob``); then, in random order, [resize to the LR size + final sinc] and JPEG.
Every probability and range is a field of ``RealESRGANConfig`` with Real-ESRGAN's defaults
(``options/train_realesrgan_x4plus.yml``). Kernels are drawn on the CPU with numpy (they are
21x21); blurring, resizing, noise and the differentiable JPEG of kornia run in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_SIZE = 21
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class StageConfig:
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma, 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)


def _second_stage() -> StageConfig:
    return StageConfig(blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
                       noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5))


@dataclass
class RealESRGANConfig:
    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = field(default_factory=_second_stage)
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8

    def validate(self) -> None:
        for stage_name in ("first", "second"):
            stage = getattr(self, stage_name)
            if len(stage.kernel_list) != len(stage.kernel_prob) or not set(stage.kernel_list) <= set(KERNEL_TYPES):
                raise ValueError(f"degradation.{stage_name}: kernel_list must name kernels from {KERNEL_TYPES} "
                                 "with one probability each")
            for f in fields(StageConfig):
                value = getattr(stage, f.name)
                if f.name.endswith(("_range", "sigma")) and not value[0] <= value[1]:
                    raise ValueError(f"degradation.{stage_name}.{f.name}: low must not exceed high")
            if abs(sum(stage.resize_prob) - 1) > 1e-6 or abs(sum(stage.kernel_prob) - 1) > 1e-6:
                raise ValueError(f"degradation.{stage_name}: resize_prob and kernel_prob must each sum to 1")


# -- kernels (numpy, as in basicsr.data.degradations) ------------------------------------------------

def _grid(size: int) -> np.ndarray:
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx, yy], axis=-1)  # (size, size, 2)


def _inverse_covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = rotation @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rotation.T
    return np.linalg.inv(cov)


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, shape: str = "gaussian",
                       beta: float = 1.0) -> np.ndarray:
    """Bivariate Gaussian, generalized Gaussian (``exp(-0.5 q^beta)``) or plateau (``1/(1+q^beta)``)."""
    grid = _grid(size)
    q = np.einsum("ijk,kl,ijl->ij", grid, _inverse_covariance(sigma_x, sigma_y, theta), grid)
    if shape == "gaussian":
        kernel = np.exp(-0.5 * q)
    elif shape == "generalized":
        kernel = np.exp(-0.5 * np.power(q, beta))
    elif shape == "plateau":
        kernel = 1.0 / (np.power(q, beta) + 1.0)
    else:
        raise ValueError(f"unknown kernel shape {shape!r}")
    return kernel / kernel.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (2-D sinc, ``omega_c J1(omega_c r) / (2 pi r)``): ringing and overshoot."""
    from scipy.special import j1

    r = np.linalg.norm(_grid(size), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * j1(cutoff * r) / (2 * np.pi * r)
    kernel[size // 2, size // 2] = cutoff ** 2 / (4 * np.pi)
    return kernel / kernel.sum()


def _pad_kernel(kernel: np.ndarray, size: int = KERNEL_SIZE) -> np.ndarray:
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def random_kernel(stage: StageConfig, rng: np.random.Generator) -> np.ndarray:
    """One 21x21 blur kernel drawn as Real-ESRGAN does (odd size 7..21, sinc with ``sinc_prob``)."""
    size = int(rng.choice([2 * v + 1 for v in range(3, 11)]))
    if rng.random() < stage.sinc_prob:
        cutoff = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        return _pad_kernel(sinc_kernel(size, cutoff))
    kind = str(rng.choice(stage.kernel_list, p=np.asarray(stage.kernel_prob) / np.sum(stage.kernel_prob)))
    sigma_x = rng.uniform(*stage.blur_sigma)
    isotropic = kind.endswith("iso") and not kind.endswith("aniso")
    sigma_y = sigma_x if isotropic else rng.uniform(*stage.blur_sigma)
    theta = 0.0 if isotropic else rng.uniform(-np.pi, np.pi)
    if kind.startswith("generalized"):
        lo, hi = stage.betag_range
        beta = rng.uniform(lo, 1) if rng.random() < 0.5 else rng.uniform(1, hi)
        kernel = anisotropic_kernel(size, sigma_x, sigma_y, theta, "generalized", beta)
    elif kind.startswith("plateau"):
        lo, hi = stage.betap_range
        beta = rng.uniform(lo, 1) if rng.random() < 0.5 else rng.uniform(1, hi)
        kernel = anisotropic_kernel(size, sigma_x, sigma_y, theta, "plateau", beta)
    else:
        kernel = anisotropic_kernel(size, sigma_x, sigma_y, theta)
    return _pad_kernel(kernel)


def pulse_kernel() -> np.ndarray:
    kernel = np.zeros((KERNEL_SIZE, KERNEL_SIZE))
    kernel[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1
    return kernel


# -- torch operations ----------------------------------------------------------------------------

def filter2d(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Blur each image (N, C, H, W) with its own kernel (N, k, k), reflect-padded (replicate on
    images smaller than the kernel, which reflection cannot pad)."""
    n, c, h, w = images.shape
    k = kernels.shape[-1]
    padded = F.pad(images, (k // 2,) * 4, mode="reflect" if k // 2 < min(h, w) else "replicate")
    weight = kernels.to(images).repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
    out = F.conv2d(padded.reshape(1, n * c, h + k - 1, w + k - 1), weight, groups=n * c)
    return out.reshape(n, c, h, w)


def _resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def _noise(images: torch.Tensor, stage: StageConfig, rng: np.random.Generator,
           generator: torch.Generator) -> torch.Tensor:
    n = images.shape[0]
    out = []
    for i in range(n):
        image = images[i:i + 1]
        gray = rng.random() < stage.gray_noise_prob
        if rng.random() < stage.gaussian_noise_prob:
            sigma = rng.uniform(*stage.noise_range) / 255
            shape = (1, 1, *image.shape[-2:]) if gray else image.shape
            noise = torch.randn(shape, generator=generator, device=generator.device).to(image) * sigma
        else:  # Poisson: photon counts at 255 levels x 10 ** 1, scaled
            scale = rng.uniform(*stage.poisson_scale_range)
            source = image.mean(1, keepdim=True) if gray else image
            clean = source.clamp(0, 1)
            counts = torch.poisson((clean * 2550).cpu().double(), generator=_cpu_generator(generator)).to(image)
            noise = (counts / 2550 - clean) * scale
        out.append(image + noise)
    return torch.cat(out)


def _cpu_generator(generator: torch.Generator) -> torch.Generator:
    if generator.device.type == "cpu":
        return generator
    seed = torch.randint(0, 2**31, (1,), generator=generator, device=generator.device)
    return torch.Generator().manual_seed(int(seed))


def _jpeg(images: torch.Tensor, stage: StageConfig, rng: np.random.Generator) -> torch.Tensor:
    from kornia.enhance import jpeg_codec_differentiable

    quality = torch.tensor([rng.uniform(*stage.jpeg_range) for _ in range(images.shape[0])],
                           dtype=images.dtype, device=images.device)
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % 16, (-w) % 16  # the codec works on whole 16x16 chroma blocks
    padded = F.pad(images.clamp(0, 1), (0, pad_w, 0, pad_h), mode="replicate")
    return jpeg_codec_differentiable(padded, quality)[..., :h, :w]


def _stage(images: torch.Tensor, stage: StageConfig, rng: np.random.Generator, generator: torch.Generator,
           reference: tuple[int, int], blur: bool) -> torch.Tensor:
    if blur:
        kernels = torch.from_numpy(np.stack([random_kernel(stage, rng) for _ in range(images.shape[0])]))
        images = filter2d(images, kernels.float())
    direction = rng.choice(3, p=stage.resize_prob)
    factor = (rng.uniform(1, stage.resize_range[1]) if direction == 0 else
              rng.uniform(stage.resize_range[0], 1) if direction == 1 else 1.0)
    size = (int(reference[0] * factor), int(reference[1] * factor))
    images = _resize(images, size, str(rng.choice(RESIZE_MODES)))
    images = _noise(images, stage, rng, generator)
    return _jpeg(images, stage, rng)


def _final_kernel(cfg: RealESRGANConfig, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < cfg.final_sinc_prob:
        size = int(rng.choice([2 * v + 1 for v in range(3, 11)]))
        return _pad_kernel(sinc_kernel(size, rng.uniform(np.pi / 3, np.pi)))
    return pulse_kernel()


def degrade_realesrgan(hr: torch.Tensor, scale: int, cfg: RealESRGANConfig, rng: np.random.Generator,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """LR images (N, 3, H/scale, W/scale) in [0, 1], quantised to 8 bits, from HR (N, 3, H, W)."""
    generator = generator or torch.Generator(device=hr.device).manual_seed(int(rng.integers(2**31)))
    h, w = hr.shape[-2:]
    out = _stage(hr, cfg.first, rng, generator, (h, w), blur=True)
    out = _stage(out, cfg.second, rng, generator, (h // scale, w // scale), blur=rng.random() < cfg.second_blur_prob)
    final_kernels = torch.from_numpy(np.stack([_final_kernel(cfg, rng) for _ in range(hr.shape[0])])).float()
    mode = str(rng.choice(RESIZE_MODES))
    if rng.random() < 0.5:  # [resize + sinc] then JPEG
        out = filter2d(_resize(out, (h // scale, w // scale), mode), final_kernels)
        out = _jpeg(out, cfg.second, rng)
    else:  # JPEG then [resize + sinc]
        out = _jpeg(out, cfg.second, rng)
        out = filter2d(_resize(out, (h // scale, w // scale), mode), final_kernels)
    return torch.clamp((out * 255).round(), 0, 255) / 255
