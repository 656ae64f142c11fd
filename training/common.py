"""Small helpers shared by the training stages."""

from __future__ import annotations

import random

import numpy as np
import torch


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
