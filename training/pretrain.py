"""The tiny preset's stand-in for a pretrained diffusion model.

MoR-DASR fine-tunes adapters on a pretrained model; SD weights cannot be downloaded here, so the
``tiny`` base is trained from scratch on the shipped photographs, in three stages:

1. ``vae``: the autoencoder (L1 reconstruction on HR crops, small latent penalty);
2. ``estimator``: the degradation estimator, fitted to the known synthetic-degradation scores;
3. ``unet``: the base UNet as a plain x4 super-resolver of *clean* bicubic inputs, in latent space.

The adapters later learn what the base does not know: blur, noise and JPEG. The result is
shipped as ``mordasr/model/pretrained/tiny``; ``mordasr-train base`` reproduces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mordasr.model import OneStepSR, preset_config
from mordasr.model.io import save_checkpoint
from mordasr.training.common import nchw, seed_everything
from mordasr.training.data import CropSampler, sample_images
from mordasr.training.degrade import Degradation, degraded_batch

log = logging.getLogger(__name__)


@dataclass
class BaseTrainingConfig:
    vae_steps: int = 2500
    estimator_steps: int = 3000
    unet_steps: int = 2000
    batch: int = 8
    crop: int = 64
    lr: float = 1e-3
    seed: int = 0


def _progress(steps: int, desc: str, quiet: bool):
    return tqdm(range(steps), desc=desc, disable=quiet, dynamic_ncols=True)


def train_vae(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    sampler = CropSampler(sample_images("train"), cfg.crop, cfg.seed)
    params = list(model.vae.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.vae_steps)
    model.vae.train()
    loss_value = float("nan")
    bar = _progress(cfg.vae_steps, "vae", quiet)
    for _ in bar:
        x = nchw(sampler.sample(cfg.batch)) * 2 - 1
        z = model.vae.quant_conv(model.vae.encoder(x))[:, : model.config.latent_channels]
        y = model.vae.decode(z).sample
        loss = (y - x).abs().mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(l1=f"{loss_value:.4f}")
    for p in params:
        p.requires_grad_(False)
    model.vae.eval()
    return loss_value


def train_estimator(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    """Fit the estimator on LR views of many sizes, so whole images and crops both score right."""
    rng = seed_everything(cfg.seed + 1)
    samplers = [CropSampler(sample_images("train"), c, cfg.seed + c) for c in (64, 128, 256)]
    est = model.estimator
    params = list(est.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.estimator_steps)
    est.train()
    loss_value = float("nan")
    bar = _progress(cfg.estimator_steps, "estimator", quiet)
    for step in bar:
        sampler = samplers[step % len(samplers)]
        hr = sampler.sample(cfg.batch * 4)
        lr_images, _, targets = degraded_batch(hr, model.config.scale, rng)
        scores = model.estimate(nchw(lr_images))
        loss = F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), torch.from_numpy(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(bce=f"{loss_value:.4f}")
    for p in params:
        p.requires_grad_(False)
    est.eval()
    return loss_value


def train_base_unet(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    """Base UNet as a clean x4 super-resolver: x0-step output matches the HR latent."""
    rng = seed_everything(cfg.seed + 2)
    sampler = CropSampler(sample_images("train"), cfg.crop, cfg.seed + 2)
    params = list(model.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.unet_steps)
    model.unet.train()
    clean = [Degradation()] * cfg.batch
    loss_value = float("nan")
    bar = _progress(cfg.unet_steps, "unet", quiet)
    for _ in bar:
        hr = sampler.sample(cfg.batch)
        lr_images, _, _ = degraded_batch(hr, model.config.scale, rng, clean)
        with torch.no_grad():
            z_l = model.encode(nchw(lr_images))
            x_hr = nchw(hr) * 2 - 1
            z_hr = model.vae.quant_conv(model.vae.encoder(x_hr))[:, : model.config.latent_channels]
            z_hr = z_hr * model.config.latent_scale
        z_h = model.schedule.x0(z_l, model.denoise(z_l))
        loss = F.mse_loss(z_h, z_hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(mse=f"{loss_value:.5f}")
    for p in params:
        p.requires_grad_(False)
    model.unet.eval()
    return loss_value


STAGES = ("vae", "estimator", "unet")


def train_base(out: str | Path, cfg: BaseTrainingConfig, quiet: bool = False,
               stages: tuple[str, ...] = STAGES, start_from: str | Path | None = None) -> Path:
    """Train the given stages in order and write the base checkpoint after each one.

    ``start_from`` continues from an existing base checkpoint (to retrain some stages only);
    otherwise training starts from random weights.
    """
    from mordasr.model.io import load_checkpoint

    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    seed_everything(cfg.seed)
    if start_from is not None:
        model, meta = load_checkpoint(start_from, add_adapters=False)
        losses, done = dict(meta.get("final_losses", {})), list(meta.get("stages_done", []))
    else:
        model, losses, done = OneStepSR(preset_config("tiny"), with_adapters=False), {}, []
    trainers = {"vae": ("vae_l1", train_vae), "estimator": ("estimator_bce", train_estimator),
                "unet": ("unet_latent_mse", train_base_unet)}
    path = Path(out)
    for stage in STAGES:
        if stage not in stages:
            continue
        key, trainer = trainers[stage]
        losses[key] = trainer(model, cfg, quiet)
        log.info("stage %s finished: %s = %.5f", stage, key, losses[key])
        done = [s for s in STAGES if s in done or s == stage]
        meta = {"kind": "base", "random_weights": False, "training": vars(cfg), "final_losses": losses,
                "stages_done": done}
        save_checkpoint(model, path, meta)
    return path
