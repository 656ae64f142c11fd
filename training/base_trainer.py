"""The tiny preset's stand-in for a pretrained diffusion model, trained on HR photographs.

MoR-DASR fine-tunes adapters on a pretrained model; SD weights cannot be had offline, so the
``tiny`` base is trained from scratch, in three stages:

1. ``vae``: the autoencoder alone (L1 reconstruction of HR crops through the latent mean);
2. ``sr``: the whole one-step path end to end -- bicubic-upsampled LR -> encoder -> UNet at the
   fixed timestep -> x0 step -> decoder -- against the HR crop (L1), on a mix of clean bicubic,
   synthetic (blur/noise/JPEG) and Real-ESRGAN second-order degradations, while the HR
   reconstruction term keeps the autoencoder an autoencoder and a latent term points the x0 step
   at the HR image's latent;
3. ``estimator``: the degradation estimator, fitted to the known parameters of synthetic
   degradations.

The adapters then specialise this base per degradation, routed by the estimator's scores. The
result ships as ``mordasr/model/pretrained/tiny``; ``mordasr-train base --data DIR`` reproduces it
from any folder of HR photographs. Each stage writes a resume state every
``checkpoint_every`` steps (``OUT/.resume/<stage>/``: weights, optimizer, scheduler, every RNG),
so a killed run continues where it stopped, and the checkpoint after each finished stage.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mordasr.data.degradations import Degradation, degraded_batch, mixed_degraded_batch
from mordasr.data.samples import CropSampler, sample_images, training_images
from mordasr.errors import MordasrError
from mordasr.metrics import psnr
from mordasr.model import OneStepSR, preset_config
from mordasr.model.io import save_checkpoint
from mordasr.training.base_config import BaseTrainingConfig
from mordasr.training.checkpoint import latest_state, restore_rng, rng_state, save_state
from mordasr.training.common import estimator_correlations, model_device, nchw, resolve_device, seed_everything
from mordasr.training.ema import WeightEMA
from mordasr.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

STAGES = ("vae", "sr", "estimator")


class _Resumable:
    """A stage's full training state -- module, optimizer, scheduler, step, EMA, every RNG -- saved
    and restored with ``training/checkpoint.py`` (the one resume format of every trainer), under
    ``OUT/.resume/<stage>/``; only the newest state is kept."""

    def __init__(self, out: Path, stage: str, module: torch.nn.Module, opt, sched,
                 generators: list[np.random.Generator], ema: WeightEMA | None = None) -> None:
        self.folder = out / ".resume" / stage
        self.module, self.opt, self.sched, self.ema = module, opt, sched, ema
        self.generators = {str(i): g for i, g in enumerate(generators)}

    def load(self) -> int:
        latest = latest_state(self.folder)
        if latest is None:
            return 0
        step, state, folder = latest
        try:
            self.module.load_state_dict(state["module"])
        except RuntimeError as err:  # e.g. --unet-channels changed between the run and its resume
            detail = str(err).splitlines()[-1].strip()
            raise MordasrError(f"{folder} was written for a model of another shape ({detail}); run the "
                               "command that wrote it again, or remove the folder to start the stage over") from None
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        restore_rng(state["rng"], self.generators)
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        elif self.ema is not None:  # a state written without EMA starts the average at its weights
            self.ema.reset(self.module)
        log.info("resumed %s at step %d", folder, step)
        return int(step)

    def save(self, step: int) -> None:
        save_state(self.folder, step, {"module": self.module.state_dict(), "opt": self.opt.state_dict(),
                                       "sched": self.sched.state_dict(), "rng": rng_state(self.generators),
                                       "ema": None if self.ema is None else self.ema.state_dict()}, keep_last=1)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _fit(module: torch.nn.Module, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float,
         stage: str, cfg: BaseTrainingConfig, out: Path, generators: list[np.random.Generator],
         quiet: bool, evaluate: Callable[[], dict[str, float]] | None = None,
         weight_decay: float = 0.0, lr_multipliers: dict[str, float] | None = None) -> float:
    """AdamW with warmup + cosine decay on ``module``'s parameters; ``loss_fn(step)`` gives each loss.

    Resumable (see ``_Resumable``); appends ``evaluate()``'s figures to ``OUT/curves-<stage>.csv``
    at every resume point. With ``cfg.ema`` the module ends with the moving average of its weights
    (``WeightEMA``), and ``evaluate()`` sees that average. The module is trainable during the fit
    and frozen afterwards.
    """
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    groups: dict[float, list] = {}
    for name, p in module.named_parameters():
        scale = next((m for prefix, m in (lr_multipliers or {}).items() if name.startswith(prefix)), 1.0)
        groups.setdefault(scale, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": lr * scale} for scale, ps in groups.items()], lr,
                            weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps, warmup=max(1, steps // 50))
    ema = WeightEMA(module, cfg.ema) if cfg.ema else None
    state = _Resumable(out, stage, module, opt, sched, generators, ema)
    start = state.load()
    averaged = contextlib.nullcontext if ema is None else lambda: ema.applied(module)
    curves = out / f"curves-{stage}.csv"
    module.train()
    loss_value, running = float("nan"), []
    bar = tqdm(range(start, steps), desc=stage, disable=quiet, dynamic_ncols=True, initial=start, total=steps)
    for step in bar:
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"stage {stage}: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(module)
        loss_value = loss.item()
        running.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.5f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "loss": float(np.mean(running))}
            running = []
            if evaluate is not None:
                module.eval()
                with averaged():
                    row.update(evaluate())
                module.train()
            _append_row(curves, row)
            log.info("%s step %d: %s", stage, step + 1, row)
            state.save(step + 1)
    if ema is not None:
        ema.copy_to(module)
    for p in params:
        p.requires_grad_(False)
    module.eval()
    state.clear()
    return loss_value


def _append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def identity_start(unet: torch.nn.Module) -> None:
    """Zero the UNet's output convolution and the second convolution of every ResNet block, so a
    fresh UNet predicts eps = 0 (the x0 step then passes the latent through) and each block starts
    as the identity: end-to-end training begins at "bicubic through the autoencoder"."""
    from diffusers.models.resnet import ResnetBlock2D

    for module in [unet.conv_out] + [m.conv2 for m in unet.modules() if isinstance(m, ResnetBlock2D)]:
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)


def unet_shape(unet: dict, channels: tuple[int, ...] | None = None, layers: int | None = None) -> dict:
    """The UNet config ``unet`` with another width (``channels``, one per level) or depth
    (``layers`` ResNet blocks per level); refused when diffusers' UNet could not take it."""
    if channels and len(channels) != len(unet["block_out_channels"]):
        raise ValueError(f"--unet-channels: {len(unet['block_out_channels'])} values, one per UNet level, "
                         f"not {len(channels)}")
    groups, head = unet["norm_num_groups"], unet["attention_head_dim"]
    if channels and any(c <= 0 or c % groups or c % head for c in channels):
        raise ValueError(f"--unet-channels: each a positive multiple of {groups} (the UNet's GroupNorm groups), "
                         f"not {','.join(map(str, channels))}")
    return {**unet, **({"block_out_channels": tuple(channels)} if channels else {}),
            **({"layers_per_block": layers} if layers else {})}


def with_unet_shape(model: OneStepSR, channels: tuple[int, ...] | None = None,
                    layers: int | None = None, new: bool = False) -> OneStepSR:
    """``model`` with a fresh, identity-started UNet of another shape (``unet_shape``), its
    autoencoder and estimator kept; ``model`` itself when the shape is already that, unless
    ``new`` asks for a fresh UNet anyway (a base that has learned no restoration in its UNet). The
    lever for a larger base than the shipped one."""
    unet = model.config.unet
    wanted = unet_shape(unet, channels, layers)
    if not new and (tuple(wanted["block_out_channels"]), wanted["layers_per_block"]) == (
            tuple(unet["block_out_channels"]), unet["layers_per_block"]):
        return model
    reshaped = OneStepSR(replace(model.config, unet=wanted), with_adapters=False)
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("unet.")}
    missing, unexpected = reshaped.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("unet.") for k in missing)
    identity_start(reshaped.unet)
    log.info("a new UNet %s x %d blocks per level (%.2f M parameters) replaces %s x %d",
             wanted["block_out_channels"], wanted["layers_per_block"],
             sum(p.numel() for p in reshaped.unet.parameters()) / 1e6, unet["block_out_channels"],
             unet["layers_per_block"])
    return reshaped


def _latent(model: OneStepSR, x: torch.Tensor) -> torch.Tensor:
    """Latent mean of images in [-1, 1] (unscaled)."""
    return model.vae.quant_conv(model.vae.encoder(x))[:, : model.config.latent_channels]


def _monitor_set(model: OneStepSR, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed crops of scikit-image's held-out photographs (never trained on) for the curves:
    half clean bicubic, half blur 1.2 + noise 5/255 + JPEG 70."""
    rng = np.random.default_rng(seed)
    hr = CropSampler(sample_images("heldout"), 128, seed).sample(8)
    degradations = [Degradation()] * 4 + [Degradation(1.2, 5 / 255, 70)] * 4
    lr, _, _ = degraded_batch(hr, model.config.scale, rng, degradations)
    device = model_device(model)
    return nchw(lr, device), nchw(hr, device)


def train_vae(model: OneStepSR, cfg: BaseTrainingConfig, out: Path, quiet: bool = False) -> float:
    """L1 reconstruction of HR crops through the latent mean, with a small latent penalty."""
    sampler = training_images(cfg.data, cfg.crop, cfg.seed)
    _, mon_hr = _monitor_set(model)
    device = model_device(model)

    def loss(_step: int) -> torch.Tensor:
        x = nchw(sampler.sample(cfg.batch), device) * 2 - 1
        z = _latent(model, x)
        return (model.vae.decode(z).sample - x).abs().mean() + 1e-4 * z.pow(2).mean()

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        rec = model.vae.decode(_latent(model, mon_hr * 2 - 1)).sample
        return {"recon_psnr": psnr((rec + 1) / 2, mon_hr)}

    return _fit(model.vae, loss, cfg.vae_steps, cfg.lr, "vae", cfg, out, [sampler.rng], quiet, evaluate)


def train_sr(model: OneStepSR, cfg: BaseTrainingConfig, out: Path, quiet: bool = False) -> float:
    """The whole one-step path end to end (encoder, UNet, decoder) on mixed degradations."""
    rng = np.random.default_rng(cfg.seed + 2)
    sampler = training_images(cfg.data, cfg.crop, cfg.seed)
    mon_lr, mon_hr = _monitor_set(model)
    trained = torch.nn.ModuleDict({"vae": model.vae, "unet": model.unet})
    n_recon = max(1, cfg.batch // 4)
    mix = cfg.degradation_mix()
    device = model_device(model)

    def loss(_step: int) -> torch.Tensor:
        hr = sampler.sample(cfg.batch)
        lr = mixed_degraded_batch(hr, model.config.scale, rng, mix)
        lr_t, hr_t = nchw(lr, device), nchw(hr, device)
        z_l = model.encode(lr_t)
        z_h = model.schedule.x0(z_l, model.denoise(z_l))
        restored = (model.vae.decode(z_h / model.config.latent_scale).sample + 1) / 2
        loss = (restored - hr_t).abs().mean()
        x = hr_t * 2 - 1
        # Encoding all eight HR crops is about a sixth of a CPU step: only those a nonzero term uses.
        if cfg.latent_weight:
            z_hr = _latent(model, x)
            loss = loss + cfg.latent_weight * F.mse_loss(z_h, z_hr.detach() * model.config.latent_scale)
        if cfg.recon_weight:
            z_rec = z_hr[:n_recon] if cfg.latent_weight else _latent(model, x[:n_recon])
            loss = loss + cfg.recon_weight * (model.vae.decode(z_rec).sample - x[:n_recon]).abs().mean()
        return loss

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        out_images = model(mon_lr, torch.zeros(len(mon_lr), model.config.num_degradations, device=device))
        bicubic = F.interpolate(mon_lr, size=mon_hr.shape[-2:], mode="bicubic", align_corners=False)
        return {"psnr_clean": psnr(out_images[:4], mon_hr[:4]), "psnr_clean_bicubic": psnr(bicubic[:4], mon_hr[:4]),
                "psnr_mixed": psnr(out_images[4:], mon_hr[4:]), "psnr_mixed_bicubic": psnr(bicubic[4:], mon_hr[4:])}

    # The x0 step scales the UNet's output by sqrt(1 - a_T) / sqrt(a_T) = 0.098 at T = 10, so a
    # change of the latent needs ten times that change of eps: the output convolution learns at
    # the inverse of that factor, or the UNet's part of the restoration starts ten times slower.
    head = model.schedule.sqrt_alpha_prod / model.schedule.sqrt_one_minus_alpha_prod
    return _fit(trained, loss, cfg.sr_steps, cfg.lr / 2, "sr", cfg, out, [sampler.rng, rng], quiet, evaluate,
                lr_multipliers={"unet.conv_out.": head})


def train_estimator(model: OneStepSR, cfg: BaseTrainingConfig, out: Path, quiet: bool = False) -> float:
    """Fit the estimator on LR views of several sizes (resized to the router input), so crops and
    whole images, whose noise a downscaled view partly hides, both score right."""
    rng = np.random.default_rng(cfg.seed + 1)
    size = model.config.router_image_size * model.config.scale  # HR side whose LR is the router input
    images = training_images(cfg.data, size // 2, cfg.seed).images
    samplers = [CropSampler(images, c, cfg.seed + c) for c in (size // 2, size * 3 // 4, size)]

    monitor = sample_images("heldout")
    device = model_device(model)

    def loss(step: int) -> torch.Tensor:
        hr = samplers[step % len(samplers)].sample(cfg.batch * 4)
        lr_images, _, targets = degraded_batch(hr, model.config.scale, rng)
        scores = model.estimate(nchw(lr_images, device))
        return F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), torch.from_numpy(targets).to(device))

    def evaluate() -> dict[str, float]:
        found = estimator_correlations(model, monitor, crops_per_image=32, crop=size)
        return {f"r_{dim}": found[dim]["pearson"] for dim in ("blur", "noise", "compression")}

    return _fit(model.estimator, loss, cfg.estimator_steps, cfg.lr, "estimator", cfg, out,
                [rng] + [s.rng for s in samplers], quiet, evaluate, weight_decay=0.01)


def train_base(out: str | Path, cfg: BaseTrainingConfig, quiet: bool = False,
               stages: tuple[str, ...] = STAGES, start_from: str | Path | None = None,
               device: str = "cpu", unet_channels: tuple[int, ...] | None = None,
               unet_layers: int | None = None, new_unet: bool = False) -> Path:
    """Train the given stages in order and write the base checkpoint after each one.

    ``start_from`` continues from an existing base checkpoint (to retrain some stages only);
    otherwise training starts from random weights. ``unet_channels`` / ``unet_layers`` give the
    UNet another shape than the tiny preset's or the start's (``with_unet_shape``: a new UNet,
    the autoencoder and estimator kept). An interrupted stage resumes from its last
    resume state when the same command runs again, on any ``device`` (``auto``, ``cpu``,
    ``cuda[:N]``): a resume state written on one device resumes on another.
    """
    from mordasr.model.io import load_checkpoint

    cfg.validate()
    target = resolve_device(device)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    seed_everything(cfg.seed)
    path = Path(out)
    source = start_from if start_from is not None else (path if (path / "config.json").is_file() else None)
    if source is not None:
        model, meta = load_checkpoint(source, add_adapters=False)
        losses, done = dict(meta.get("final_losses", {})), list(meta.get("stages_done", []))
        history = list(meta.get("history", []))
        reshaped = with_unet_shape(model, unet_channels, unet_layers, new=new_unet)
        if reshaped is not model:
            if "sr" not in stages:
                raise ValueError("--unet-channels / --unet-layers / --new-unet replace the UNet with a new, untrained "
                                 "one: train it with the sr stage (--stages sr)")
            model, losses = reshaped, {k: v for k, v in losses.items() if k != "sr_l1"}
            done = [s for s in done if s != "sr"]
    else:
        preset = preset_config("tiny")
        model = OneStepSR(replace(preset, unet=unet_shape(preset.unet, unet_channels, unet_layers)),
                          with_adapters=False)
        losses, done, history = {}, [], []
        identity_start(model.unet)
    work = path.parent / f".{path.name}.work"  # resume states and curves live beside the checkpoint
    work.mkdir(parents=True, exist_ok=True)
    model.to(target)
    trainers = {"vae": ("vae_l1", train_vae), "sr": ("sr_l1", train_sr),
                "estimator": ("estimator_bce", train_estimator)}
    for stage in STAGES:
        if stage not in stages or (source == path and stage in done and not start_from):
            continue
        key, trainer = trainers[stage]
        losses[key] = trainer(model, cfg, work, quiet)
        log.info("stage %s finished: %s = %.5f", stage, key, losses[key])
        done = [s for s in STAGES if s in done or s == stage]
        history.append({"stage": stage, **vars(cfg), "device": target.type, "final_loss": losses[key]})
        meta = {"kind": "base", "random_weights": False, "training": vars(cfg), "final_losses": losses,
                "stages_done": done, "history": history}
        save_checkpoint(model, path, meta)
    return path
