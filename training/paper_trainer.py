"""``mordasr-train fit``: MoR-DASR training at paper fidelity.

Per step: HR crops -> Real-ESRGAN second-order degradation -> frozen estimator scores -> generator
(adapters on the encoder and UNet) -> ``L_rec`` (L2 + perceptual) + lambda1 ``L_VSD`` + lambda2
``L_GAN`` + the degradation-aware load balance; then the variational UNet's diffusion step and the
discriminator's step. AdamW with warmup + cosine, gradient accumulation and clipping, bf16 autocast
on CUDA, optional EMA. ``torchrun`` runs it data-parallel (DistributedDataParallel: NCCL on GPUs,
gloo on CPUs); every rank draws different crops and the averaged gradients keep the replicas equal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mordasr.data.realesrgan import degrade_realesrgan
from mordasr.errors import MordasrError
from mordasr.metrics import psnr
from mordasr.model import OneStepSR
from mordasr.model.losses import clear_routing, load_balance_loss
from mordasr.training.ablations import build_model
from mordasr.training.checkpoint import load_latest, restore_rng, rng_state, save_state
from mordasr.training.common import nchw
from mordasr.training.distributed import Distributed
from mordasr.training.ema import WeightEMA
from mordasr.training.gan import MultiScaleDiscriminator, discriminator_loss, generator_adversarial_loss
from mordasr.training.paper_config import FitConfig, write_resolved
from mordasr.training.perceptual import perceptual_loss, ssim
from mordasr.training.run_log import router_statistics, tensorboard, write_metrics
from mordasr.training.schedule import warmup_cosine
from mordasr.training.vsd import VSDRegularizer

log = logging.getLogger(__name__)

class GeneratorStep(nn.Module):
    """The generator as one module (what DDP wraps): restored image and its latent z_h."""

    def __init__(self, model: OneStepSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, lr: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        with m.routing.scores_for(scores):
            z_l = m.encode(lr)
            z_h = m.schedule.x0(z_l, m.denoise(z_l))
        return m.decode(z_h), z_h


class FitTrainer:
    def __init__(self, cfg: FitConfig, out: str | Path, resume: bool = False, quiet: bool = False) -> None:
        self.cfg, self.out, self.quiet = cfg, Path(out), quiet
        self.dist = Distributed()
        self.device = self.dist.device
        self.model, self.aware_balance, self.meta = build_model(cfg)
        self.model.to(self.device)
        self.scale = self.model.config.scale
        self.generator = self.dist.wrap(GeneratorStep(self.model))
        self.params = self.model.adapter_parameters()
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.sched = warmup_cosine(self.opt, cfg.run.steps, o.warmup_steps)
        self.perceptual, self.perceptual_name = perceptual_loss(cfg.loss.lpips_weights)
        self.perceptual.to(self.device)
        self.vsd = None
        if cfg.loss.vsd > 0:
            self.vsd = VSDRegularizer(self.model, cfg.vsd).to(self.device)
            self.vsd.variational = self.dist.wrap(self.vsd.variational)
            self.opt_vsd = torch.optim.AdamW(self.vsd.variational_parameters(), cfg.vsd.lr)
        self.disc = None
        if cfg.loss.gan > 0:
            critic = MultiScaleDiscriminator(cfg.gan.scales, cfg.gan.channels).to(self.device)
            # The generator's adversarial term goes through the bare module with frozen weights;
            # only the discriminator's own step goes through DDP (it expects every weight's grad).
            self.critic = critic
            self.disc = self.dist.wrap(critic)
            self.opt_disc = torch.optim.AdamW(self.disc.parameters(), cfg.gan.lr, betas=(0.5, 0.999))
        self.ema = WeightEMA(self.model, o.ema) if o.ema > 0 else None
        self._data(cfg)
        self.step = 0
        self.rows: list[dict] = []
        if resume:
            self._resume()
        elif (self.out / "checkpoints").exists() and any((self.out / "checkpoints").iterdir()):
            raise MordasrError(f"{self.out} already holds checkpoints: pass --resume to continue, "
                               "or choose a new --out")
        self.amp = (o.amp == "bf16" or (o.amp == "auto" and self.device.type == "cuda"))

    # -- data ------------------------------------------------------------------------------------
    def _data(self, cfg: FitConfig) -> None:
        from mordasr.data.samples import CropSampler, sample_images

        seed = cfg.run.seed + 1000 * self.dist.rank  # each rank its own crops and degradations
        d = cfg.data
        if d.train_dir:
            from mordasr.data.folders import HRFolder

            self.train = HRFolder(d.train_dir, d.crop, seed)
            self.skipped = len(self.train.skipped)
        else:
            self.train = CropSampler(sample_images("train"), d.crop, seed)
            self.skipped = 0
        self.degrade_rng = np.random.default_rng(seed + 1)
        self.torch_gen = torch.Generator().manual_seed(seed + 2)
        if d.val_dir:
            from mordasr.data.folders import PairedFolder

            pairs = PairedFolder(d.val_dir, self.scale, limit=d.val_images).pairs
            self.val = [(nchw(lr[None]), nchw(hr[None])) for _, lr, hr in pairs]
        else:  # fixed Real-ESRGAN degradations of held-out crops (same seed on every rank)
            val_rng = np.random.default_rng(4321)
            crops = CropSampler(sample_images("heldout"), d.crop * 2, 4321).sample(d.val_images)
            hr = nchw(crops)
            lr = degrade_realesrgan(hr, self.scale, d.degradation, val_rng, torch.Generator().manual_seed(4321))
            self.val = [(lr[i:i + 1], hr[i:i + 1]) for i in range(len(hr))]

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        hr = nchw(self.train.sample(self.cfg.data.batch)).to(self.device)
        lr = degrade_realesrgan(hr, self.scale, self.cfg.data.degradation, self.degrade_rng, self.torch_gen)
        return lr, hr

    # -- one optimisation step ----------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        cfg, w = self.cfg, self.cfg.loss
        self.model.train()
        self.model.estimator.eval()  # frozen: its norms must not learn batch statistics
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        stats: dict = {}
        kept_for_critics = []
        for micro in range(cfg.optim.grad_accum):
            lr, hr = self._batch()
            with torch.no_grad():
                scores = self.model.estimate(lr)
            clear_routing(self.model)
            sync = (micro == cfg.optim.grad_accum - 1 or self.dist.world == 1)
            context = contextlib.nullcontext() if sync else self.generator.no_sync()
            with context, self._autocast():
                restored, z_h = self.generator(lr, scores)
                restored = restored.float()
                terms = {"l2": F.mse_loss(restored, hr),
                         "perceptual": self.perceptual(restored, hr).mean()}
                if self.vsd is not None:
                    terms["vsd"] = self.vsd.generator_loss(z_h.float(), self.torch_gen)
                if self.disc is not None:
                    self.critic.requires_grad_(False)
                    terms["gan"] = generator_adversarial_loss(self.critic(restored), cfg.gan.loss)
                    self.critic.requires_grad_(True)
                terms["balance"] = load_balance_loss(self.model, scores[:, 0], w.balance_alpha, self.aware_balance)
                weights = {"l2": w.l2, "perceptual": w.perceptual, "vsd": w.vsd, "gan": w.gan, "balance": w.balance}
                loss = sum(weights[k] * v for k, v in terms.items())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {self.step + 1}: "
                                         + ", ".join(f"{k}={v.item():.3g}" for k, v in terms.items()))
            (loss / cfg.optim.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v.item() / cfg.optim.grad_accum
            totals["loss"] = totals.get("loss", 0.0) + loss.item() / cfg.optim.grad_accum
            if micro == 0:
                stats = router_statistics(self.model, scores[:, 0])
            kept_for_critics.append((z_h.detach().float(), restored.detach(), hr))
        if cfg.optim.grad_clip > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip))
        self.opt.step()
        self.sched.step()
        self._update_ema()
        for z_h, restored, hr in kept_for_critics[-1:]:
            if self.vsd is not None:  # the variational UNet follows the generator's latents
                self.opt_vsd.zero_grad(set_to_none=True)
                vloss = self.vsd.variational_loss(z_h, self.torch_gen)
                vloss.backward()
                self.opt_vsd.step()
                totals["vsd_diffusion"] = vloss.item()
            if self.disc is not None:
                self.opt_disc.zero_grad(set_to_none=True)
                dloss = discriminator_loss(self.disc(hr), self.disc(restored), cfg.gan.loss)
                dloss.backward()
                self.opt_disc.step()
                totals["disc"] = dloss.item()
        self.step += 1
        totals.update({k: v for k, v in stats.items() if k != "expert_usage"})
        self.last_usage = stats.get("expert_usage")
        return totals

    def _update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def _ema_weights(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.ema is None else self.ema.applied(self.model)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        psnrs, ssims, bicubic = [], [], []
        m = 8  # the UNet's down-sampling needs even latents: reflect-pad the LR, crop the output
        with self._ema_weights():
            for lr, hr in self.val:
                lr, hr = lr.to(self.device), hr.to(self.device)
                h, w = lr.shape[-2:]
                padded = F.pad(lr, (0, (-w) % m, 0, (-h) % m), mode="reflect") if (h % m or w % m) else lr
                out = self.model(padded)[..., : h * self.scale, : w * self.scale]
                psnrs.append(psnr(out, hr))
                ssims.append(float(ssim(out.clamp(0, 1), hr).mean()))
                up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
                bicubic.append(psnr(up, hr))
        self.model.train()
        return {"val_psnr": float(np.mean(psnrs)), "val_ssim": float(np.mean(ssims)),
                "val_psnr_bicubic": float(np.mean(bicubic))}

    # -- state -------------------------------------------------------------------------------------
    def _generators(self) -> dict[str, np.random.Generator]:
        return {"data": self.train.rng, "degrade": self.degrade_rng}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                if k in names or ".adaptir." in k}

    def state(self) -> dict:
        state = {"preset": self.cfg.run.preset, "adapter": self.model.config.adapter.kind, "step": self.step,
                 "model": self._trainable_state(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                 "rng": rng_state(self._generators()), "torch_gen": self.torch_gen.get_state(),
                 "ema": None if self.ema is None else self.ema.state_dict(), "rows": self.rows}
        if self.vsd is not None:
            state["vsd"] = {k: v.cpu() for k, v in self.vsd.variational.state_dict().items() if "lora_" in k}
            state["opt_vsd"] = self.opt_vsd.state_dict()
        if self.disc is not None:
            state["disc"] = self.disc.state_dict()
            state["opt_disc"] = self.opt_disc.state_dict()
        return state

    def _resume(self) -> None:
        found = load_latest(self.out, self.cfg.run.preset, self.model.config.adapter.kind)
        if found is None:
            raise MordasrError(f"--resume: {self.out} has no checkpoint to resume from")
        self.step, state = found
        missing = set(state["model"]) - set(self.model.state_dict())
        if missing:
            raise MordasrError(f"checkpoint tensors do not fit this model (e.g. {sorted(missing)[0]}); "
                               "resume with the config it was trained with")
        self.model.load_state_dict(state["model"], strict=False)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        restore_rng(state["rng"], self._generators())
        self.torch_gen.set_state(state["torch_gen"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.rows = state["rows"]
        if self.vsd is not None and "vsd" in state:
            self.vsd.variational.load_state_dict(state["vsd"], strict=False)
            self.opt_vsd.load_state_dict(state["opt_vsd"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_disc.load_state_dict(state["opt_disc"])
        log.info("resumed from step %d", self.step)

    def replica_digest(self) -> str:
        digest = hashlib.sha256()
        for name, value in sorted(self._trainable_state().items()):
            digest.update(name.encode())
            digest.update(value.float().numpy().tobytes())
        return digest.hexdigest()

    # -- the run -----------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to ``run.steps``; ``stop_after`` ends this session after that many steps with a
        checkpoint (a time-limited job slot), to be continued with ``--resume``."""
        from tqdm import tqdm

        from mordasr.model.io import save_checkpoint

        cfg = self.cfg
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, self.out)
            log.info("perceptual loss: %s", self.perceptual_name)
            if self.skipped:
                log.warning("%d training images skipped (unreadable or too small)", self.skipped)
        writer = tensorboard(self.out) if self.dist.main else None
        if self.step == 0 and not self.rows:
            self.rows.append({"step": 0, **self.validate()})
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc=f"fit {self.model.config.adapter.kind}",
                   disable=self.quiet or not self.dist.main, dynamic_ncols=True)
        start = time.perf_counter()
        first_step = self.step
        last = cfg.run.steps if stop_after is None else min(cfg.run.steps, self.step + stop_after)
        while self.step < last:
            totals = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{totals['loss']:.4f}", l2=f"{totals['l2']:.4f}")
            row = None
            if self.step % cfg.run.log_every == 0 or self.step % cfg.run.eval_every == 0 or self.step == cfg.run.steps:
                row = {"step": self.step, "lr": self.sched.get_last_lr()[0],
                       "images_per_s": (self.step - first_step) * cfg.data.batch * cfg.optim.grad_accum
                       * self.dist.world / (time.perf_counter() - start), **totals}
            if self.step % cfg.run.eval_every == 0 or self.step == cfg.run.steps:
                row.update(self.validate())
                if self.dist.main and self.last_usage:
                    (self.out / "router_stats.json").write_text(json.dumps(
                        {"step": self.step, "expert_usage": self.last_usage}, indent=1))
            if row is not None:
                self.rows.append(row)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, float):
                            writer.add_scalar(key, value, self.step)
            if self.step % cfg.run.checkpoint_every == 0 or self.step == last:
                if self.dist.main:
                    save_state(self.out, self.step, self.state(), cfg.run.keep_last)
                    write_metrics(self.out, self.rows)
                self.dist.barrier()
        bar.close()
        result = {"final": self.rows[-1], "first": self.rows[0], "perceptual": self.perceptual_name,
                  "finished": self.step >= cfg.run.steps}
        if self.dist.world > 1:
            digests = [None] * self.dist.world
            torch.distributed.all_gather_object(digests, self.replica_digest())
            result["replicas_in_sync"] = len(set(digests)) == 1
            if self.dist.main:
                (self.out / "distributed.json").write_text(json.dumps(
                    {"world_size": self.dist.world, "backend": torch.distributed.get_backend(),
                     "digests": digests, "in_sync": result["replicas_in_sync"]}, indent=1))
        if self.dist.main and result["finished"]:
            with self._ema_weights():
                save_checkpoint(self.model.eval(), self.out / "model",
                                {"kind": "adapted", "random_weights": self.meta.get("random_weights", False),
                                 "training": self.cfg.to_dict(), "final_metrics": self.rows[-1]})
            write_metrics(self.out, self.rows)
        if writer is not None:
            writer.close()
        return result
