"""Settings of the tiny base pretraining (kept torch-free so ``--help`` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BaseTrainingConfig:
    data: str | None = None  # folder of HR photographs (recursive); None: scikit-image's photographs
    vae_steps: int = 2500  # stage "vae": autoencoder alone
    sr_steps: int = 1500  # stage "sr": encoder + UNet + decoder end to end on degraded inputs
    estimator_steps: int = 2000  # stage "estimator": degradation scores (its held-out r flattens by ~2000)
    batch: int = 8
    crop: int = 64  # HR crop side in pixels (the LR input is crop / scale)
    lr: float = 1e-3  # AdamW peak learning rate (vae, estimator); the sr stage uses half
    recon_weight: float = 0.5  # sr stage: weight of the HR reconstruction term that keeps the VAE a VAE
    latent_weight: float = 0.1  # sr stage: weight of |z_h - Enc(HR)|^2 (the x0 step aims at the HR latent)
    # sr stage: share of each degradation kind in a batch. Mostly clean and light synthetic ones:
    # with 30 % Real-ESRGAN inputs the stage stayed at bicubic level for 500 steps, while clean
    # inputs gained +0.24 dB in 150 (benchmarks/results/tiny-base/README.md); heavy degradations
    # are the adapters' job.
    sr_mix: str = "clean=0.5,synthetic=0.4,realesrgan=0.1"
    ema: float = 0.0  # decay of a moving average of the weights each stage ends with; 0: off (the last weights)
    checkpoint_every: int = 250  # steps between resume states within a stage
    seed: int = 0

    def validate(self) -> None:
        for name in ("vae_steps", "sr_steps", "estimator_steps", "batch", "crop", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.crop % 16:
            raise ValueError("crop must be a multiple of 16 (scale x the latent grid's multiple)")
        self.degradation_mix()
        if self.recon_weight < 0 or self.latent_weight < 0:
            raise ValueError("recon_weight and latent_weight must be >= 0")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")

    def degradation_mix(self) -> tuple[tuple[str, float], ...]:
        """``sr_mix`` as ((kind, probability), ...), normalised to sum to 1."""
        from mordasr.data.degradations import parse_mix

        return parse_mix(self.sr_mix, "sr_mix")
