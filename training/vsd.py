"""Variational score distillation (VSD) as OSEDiff uses it for one-step SR.

Two UNets beside the generator: the frozen pretrained UNet (the base, adapters stripped) and the
variational score network, a LoRA'd copy of the base trained on the generator's latents with the
ordinary diffusion loss. For a generated latent z, a timestep t in [t_min, t_max] and noise e:

    x_t   = sqrt(a_t) z + sqrt(1 - a_t) e
    x0_pre  from the pretrained UNet with classifier-free guidance (a fixed negative embedding)
    x0_lora from the variational network
    grad  = (x0_lora - x0_pre) / mean|z - x0_pre|          (per sample)
    L_VSD = 0.5 mse(z, stopgrad(z - grad))                 (its gradient w.r.t. z is grad / numel)

The variational network learns ``mse(eps_lora(x_t, t), e)`` on ``stopgrad(z)`` with its own
optimizer, alternately with the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mordasr.model import OneStepSR
from mordasr.model.adapters import RoutingContext
from mordasr.model.config import UNET_TARGETS, AdapterConfig
from mordasr.model.inject import inject_adapters, strip_adapters


@dataclass
class VSDConfig:
    t_min: int = 20
    t_max: int = 980
    guidance: float = 7.5
    lora_rank: int = 4
    lr: float = 1e-4


class VSDRegularizer(nn.Module):
    def __init__(self, model: OneStepSR, cfg: VSDConfig, negative: torch.Tensor | None = None) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.cfg = cfg
        self.pretrained = strip_adapters(model.unet).requires_grad_(False).eval()
        self.variational = strip_adapters(model.unet).requires_grad_(False)
        self.routing = RoutingContext()  # dense LoRA ignores scores but reads the batch size
        inject_adapters(self.variational, UNET_TARGETS, AdapterConfig(kind="lora", r_shared=cfg.lora_rank, r_routed=0),
                        model.config.num_degradations, self.routing)
        self.num_scores = model.config.num_degradations
        self.register_buffer("text", model.null_text.detach().clone())
        if negative is None:  # a fixed stand-in for the negative prompt's embedding (no text encoder here)
            negative = torch.randn(self.text.shape, generator=torch.Generator().manual_seed(1234))
        self.register_buffer("negative", negative.to(self.text))
        alphas = DDPMScheduler(**model.config.scheduler).alphas_cumprod.float()
        self.register_buffer("alphas_cumprod", alphas)

    def variational_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.variational.named_parameters() if "lora_" in n]

    def _noised(self, z: torch.Tensor, generator: torch.Generator | None):
        n = z.shape[0]
        t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (n,), generator=generator, device="cpu").to(z.device)
        noise = torch.randn(z.shape, generator=generator, device="cpu").to(z)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(z)
        return t, noise, a, a.sqrt() * z + (1 - a).sqrt() * noise

    def _eps(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        with self.routing.scores_for(torch.zeros(x_t.shape[0], self.num_scores, device=x_t.device, dtype=x_t.dtype)):
            return unet(x_t, t, encoder_hidden_states=text.expand(x_t.shape[0], -1, -1)).sample

    def generator_loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_VSD for the generator's latents ``z`` (gradients flow into ``z`` only)."""
        with torch.no_grad():
            t, _, a, x_t = self._noised(z, generator)
            cond = self._eps(self.pretrained, x_t, t, self.text)
            uncond = self._eps(self.pretrained, x_t, t, self.negative)
            eps_pre = uncond + self.cfg.guidance * (cond - uncond)
            eps_lora = self._eps(self.variational, x_t, t, self.text)
            x0_pre = (x_t - (1 - a).sqrt() * eps_pre) / a.sqrt()
            x0_lora = (x_t - (1 - a).sqrt() * eps_lora) / a.sqrt()
            weight = (z - x0_pre).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
            grad = torch.nan_to_num((x0_lora - x0_pre) / weight)
        return 0.5 * F.mse_loss(z, (z - grad).detach())

    def variational_loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion loss of the variational network on the generator's (detached) latents."""
        t, noise, _, x_t = self._noised(z.detach(), generator)
        return F.mse_loss(self._eps(self.variational, x_t, t, self.text), noise)
