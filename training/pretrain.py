"""The tiny preset's stand-in for a pretrained diffusion model.

MoR-DASR fine-tunes adapters on a pretrained model; SD weights cannot be downloaded here, so the
``tiny`` base is trained from scratch on the shipped photographs, in three stages:

1. ``vae``: the autoencoder (L1 reconstruction on HR crops, small latent penalty);
2. ``estimator``: the degradation estimator, fitted to the known synthetic-degradation scores;
3. ``unet``: the base UNet as a plain x4 super-resolver of degraded inputs, in latent space.

The adapters then specialise it per degradation, routed by the estimator's scores. The result is
shipped as ``mordasr/model/pretrained/tiny``; ``mordasr-train base`` reproduces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mordasr.model import OneStepSR, preset_config
from mordasr.model.io import save_checkpoint
from mordasr.training.common import nchw, seed_everything
from mordasr.training.data import CropSampler, sample_images
from mordasr.training.degrade import degraded_batch
from mordasr.training.pretrain_config import BaseTrainingConfig

log = logging.getLogger(__name__)


def _fit(module: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
         desc: str, quiet: bool, weight_decay: float = 0.0) -> float:
    """AdamW with cosine decay on ``module``'s parameters; ``loss_fn(step)`` gives each loss.

    The module is trainable during the fit and frozen (eval mode) afterwards.
    """
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    module.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=desc, disable=quiet, dynamic_ncols=True)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.5f}")
    for p in params:
        p.requires_grad_(False)
    module.eval()
    return loss_value


def train_vae(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    """L1 reconstruction of HR crops through the latent mean, with a small latent penalty."""
    sampler = CropSampler(sample_images("train"), cfg.crop, cfg.seed)

    def loss(_step: int) -> torch.Tensor:
        x = nchw(sampler.sample(cfg.batch)) * 2 - 1
        z = model.vae.quant_conv(model.vae.encoder(x))[:, : model.config.latent_channels]
        return (model.vae.decode(z).sample - x).abs().mean() + 1e-4 * z.pow(2).mean()

    return _fit(model.vae, loss, cfg.vae_steps, cfg.lr, "vae", quiet)


def train_estimator(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    """Fit the estimator on LR views of many sizes (16 to 128 px, resized to the router input), so
    crops and whole images, whose noise a downscaled view partly hides, both score right."""
    rng = seed_everything(cfg.seed + 1)
    samplers = [CropSampler(sample_images("train"), c, cfg.seed + c) for c in (64, 128, 256, 512)]

    def loss(step: int) -> torch.Tensor:
        hr = samplers[step % len(samplers)].sample(cfg.batch * 4)
        lr_images, _, targets = degraded_batch(hr, model.config.scale, rng)
        scores = model.estimate(nchw(lr_images))
        return F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), torch.from_numpy(targets))

    return _fit(model.estimator, loss, cfg.estimator_steps, cfg.lr, "estimator", quiet, weight_decay=0.01)


def train_base_unet(model: OneStepSR, cfg: BaseTrainingConfig, quiet: bool = False) -> float:
    """Base UNet as a plain x4 super-resolver of degraded inputs: x0-step output matches the HR latent.

    It sees the same random degradations as the adapters will, but as one dense model without
    routing; the adapters then specialise it per degradation.
    """
    rng = seed_everything(cfg.seed + 2)
    sampler = CropSampler(sample_images("train"), cfg.crop, cfg.seed + 2)

    def loss(_step: int) -> torch.Tensor:
        hr = sampler.sample(cfg.batch)
        lr_images, _, _ = degraded_batch(hr, model.config.scale, rng)
        with torch.no_grad():
            z_l = model.encode(nchw(lr_images))
            z_hr = model.vae.quant_conv(model.vae.encoder(nchw(hr) * 2 - 1))[:, : model.config.latent_channels]
            z_hr = z_hr * model.config.latent_scale
        return F.mse_loss(model.schedule.x0(z_l, model.denoise(z_l)), z_hr)

    return _fit(model.unet, loss, cfg.unet_steps, cfg.lr, "unet", quiet)


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
        history = list(meta.get("history", []))
    else:
        model, losses, done = OneStepSR(preset_config("tiny"), with_adapters=False), {}, []
        history = []
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
        history.append({"stage": stage, **vars(cfg), "final_loss": losses[key]})
        meta = {"kind": "base", "random_weights": False, "training": vars(cfg), "final_losses": losses,
                "stages_done": done, "history": history}
        save_checkpoint(model, path, meta)
    return path
