"""Small helpers shared by the training stages."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

PRECISIONS = ("bf16", "fp32")  # of a training step's forward pass on the CPU


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU (AVX-512 BF16 / AMX run convolutions in it), or nothing (FP32)."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def nchw(batch: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, 3) float numpy -> (N, 3, H, W) float32 tensor, on ``device`` when given."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()
    return tensor if device is None else tensor.to(device)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when PyTorch sees a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); "
                         "use --device cpu")
    return device


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the whole model lives on one device)."""
    return next(module.parameters()).device


def estimator_correlations(model, images: list[np.ndarray], crops_per_image: int = 8, crop: int = 256,
                           seed: int = 0) -> dict:
    """Pearson correlation of ``model.estimate``'s blur, noise and compression scores with the true
    blur sigma, noise sigma and (100 - JPEG quality) of seeded synthetic degradations of HR crops
    (each factor drawn independently, present or absent, then a strength, as in training).
    ``model`` is a OneStepSR; images smaller than ``crop`` are skipped."""
    import torch

    from mordasr.data.degradations import degrade, random_degradation

    names = [p[0] for p in model.config.prompts]
    rng = np.random.default_rng(seed)
    strengths, lr_crops = [], []
    for hr in images:
        h, w = hr.shape[:2]
        if min(h, w) < crop:
            continue
        for _ in range(crops_per_image):
            y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            deg = random_degradation(rng)
            lr_crops.append(degrade(hr[y:y + crop, x:x + crop], deg, model.config.scale, rng))
            strengths.append((deg.blur_sigma, deg.noise_sigma * 255,
                              0.0 if deg.jpeg_quality is None else 100.0 - deg.jpeg_quality))
    if len(strengths) < 2:
        raise ValueError(f"estimator_correlations: no image is at least {crop} px on its short side")
    with torch.no_grad():  # every crop has the same size: one batch
        scores = model.estimate(nchw(np.stack(lr_crops), model_device(model))).cpu().numpy()
    truth = np.array(strengths)
    pairs = {"blur": ("blur sigma", 0), "noise": ("noise sigma", 1), "compression": ("100 - JPEG quality", 2)}
    result: dict = {"samples": len(truth), "crop": crop}
    for dim, (label, column) in pairs.items():
        r = np.corrcoef(scores[:, names.index(dim)], truth[:, column])[0, 1]
        result[dim] = {"vs": label, "pearson": float(r)}
    return result
