"""Minimal adapter trainer: L2 reconstruction + degradation-aware load balance, AdamW.

Trains only the adapters (LoRA/MoR on the encoder and UNet, and the MoR routers) on top of a
frozen base, on synthetic degradations of the shipped photographs; validates on fixed degraded
crops of held-out photographs (PSNR of the model and of bicubic upsampling).
Paper-fidelity training (Real-ESRGAN degradations, VSD, GAN, resume, torchrun) is
``mordasr-train fit`` (``training/paper_trainer.py``); this quick path serves the demo and the benchmarks.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mordasr.data.degradations import degraded_batch, mixed_degraded_batch, parse_mix, random_degradation
from mordasr.data.samples import CropSampler, sample_images, training_images
from mordasr.metrics import psnr
from mordasr.model import OneStepSR
from mordasr.model.io import save_checkpoint
from mordasr.model.losses import clear_routing, load_balance_loss
from mordasr.training.common import PRECISIONS, autocast, nchw, seed_everything
from mordasr.training.schedule import warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class AdapterTrainingConfig:
    steps: int = 300
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    balance_weight: float = 0.01
    balance_alpha: float = 1.0
    eval_every: int = 100
    eval_crops: int = 8
    data: str | None = None  # folder of HR photographs; None: scikit-image's photographs
    mix: str = "clean=0.25,synthetic=0.45,realesrgan=0.30"  # degradation kinds of the training inputs
    precision: str = "fp32"  # bf16: the forward pass under CPU autocast
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch", "crop", "eval_crops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        parse_mix(self.mix, "--mix")


def validation_set(model: OneStepSR, crops: int, crop: int, seed: int = 1234):
    """Fixed degraded crops of the held-out photographs: (lr, hr) tensors."""
    rng = np.random.default_rng(seed)
    sampler = CropSampler(sample_images("heldout"), crop * 2, seed)
    hr = sampler.sample(crops)
    degradations = [random_degradation(rng) for _ in range(crops)]
    lr, _, _ = degraded_batch(hr, model.config.scale, rng, degradations)
    return nchw(lr), nchw(hr)


@torch.no_grad()
def evaluate(model: OneStepSR, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    was_training = model.training
    model.eval()
    out = model(lr)
    bicubic = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False)
    model.train(was_training)
    return {"psnr": psnr(out, hr), "psnr_bicubic": psnr(bicubic, hr)}


def train_adapters(model: OneStepSR, cfg: AdapterTrainingConfig, out: str | Path | None = None,
                   quiet: bool = False, random_weights: bool = False) -> dict[str, float]:
    """Train the model's adapters in place; write ``metrics.csv`` and the checkpoint under ``out``."""
    cfg.validate()
    if not model.has_adapters:
        raise ValueError("the model has no adapters to train")
    rng = seed_everything(cfg.seed)
    mix = parse_mix(cfg.mix, "--mix")
    sampler = training_images(cfg.data, cfg.crop, cfg.seed)
    val_lr, val_hr = validation_set(model, cfg.eval_crops, cfg.crop)
    params = model.adapter_parameters()
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=cfg.weight_decay)
    sched = warmup_cosine(opt, cfg.steps)
    out_dir = Path(out) if out is not None else None
    rows: list[dict] = []
    metrics = {"step": 0, **evaluate(model, val_lr, val_hr)}
    rows.append(metrics)
    log.info("step 0: val PSNR %.2f dB (bicubic %.2f dB)", metrics["psnr"], metrics["psnr_bicubic"])
    model.train()
    bar = tqdm(range(1, cfg.steps + 1), desc=f"train {model.config.adapter.kind}", disable=quiet,
               dynamic_ncols=True)
    for step in bar:
        hr = sampler.sample(cfg.batch)
        lr_t, hr_t = nchw(mixed_degraded_batch(hr, model.config.scale, rng, mix)), nchw(hr)
        with torch.no_grad():
            scores = model.estimate(lr_t)
        clear_routing(model)
        with autocast(cfg.precision):
            restored = model(lr_t, scores)
        rec = F.mse_loss(restored.float(), hr_t)
        bal = load_balance_loss(model, scores[:, 0], cfg.balance_alpha)
        loss = rec + cfg.balance_weight * bal
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(l2=f"{rec.item():.5f}", bal=f"{bal.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = {"step": step, "loss_rec": rec.item(), "loss_bal": bal.item(),
                       **evaluate(model, val_lr, val_hr)}
            rows.append(metrics)
            log.info("step %d: val PSNR %.2f dB (bicubic %.2f dB)", step, metrics["psnr"],
                     metrics["psnr_bicubic"])
    model.eval()
    clear_routing(model)
    if out_dir is not None:
        save_checkpoint(model, out_dir, {"kind": "adapted", "random_weights": random_weights,
                                         "training": asdict(cfg), "final_metrics": rows[-1]})
        with open(out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    return rows[-1]
