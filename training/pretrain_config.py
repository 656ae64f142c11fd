"""Settings of the tiny base pretraining (kept torch-free so ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BaseTrainingConfig:
    vae_steps: int = 2500
    estimator_steps: int = 3000
    unet_steps: int = 2000
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    seed: int = 0
