"""Small helpers shared by the training stages."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def nchw(batch: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) float numpy -> (N, 3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).item()
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))
