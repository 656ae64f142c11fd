"""Settings of the tiny base pretraining (kept torch-free so ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BaseTrainingConfig:
    data: str | None = None  # folder of HR photographs (recursive); None: scikit-image's photographs
    vae_steps: int = 2500  # stage "vae": autoencoder alone
    sr_steps: int = 1500  # stage "sr": encoder + UNet + decoder end to end on degraded inputs
    estimator_steps: int = 800  # stage "estimator": degradation scores
    batch: int = 8
    crop: int = 64  # HR crop side in pixels (the LR input is crop / scale)
    lr: float = 1e-3  # AdamW peak learning rate (vae, estimator); the sr stage uses half
    recon_weight: float = 0.5  # sr stage: weight of the HR reconstruction term that keeps the VAE a VAE
    latent_weight: float = 0.1  # sr stage: weight of |z_h - Enc(HR)|^2 (the x0 step aims at the HR latent)
    checkpoint_every: int = 250  # steps between resume states within a stage
    seed: int = 0

    def validate(self) -> None:
        for name in ("vae_steps", "sr_steps", "estimator_steps", "batch", "crop", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.crop % 16:
            raise ValueError("crop must be a multiple of 16 (scale x the latent grid's multiple)")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
