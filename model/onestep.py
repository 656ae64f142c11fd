"""OneStepSR: the MoR-DASR data path in PyTorch.

    x      = bicubic_upsample(x_lr, scale) * 2 - 1
    d      = DegradationEstimator(view(x_lr))
    z_l    = Enc(x).mean * latent_scale                 (adapters on the encoder)
    eps    = UNet(z_l, t=T, text=null, route=d)         (adapters on the UNet)
    z_h    = (z_l - sqrt(1 - a_T) eps) / sqrt(a_T)
    x_h    = Dec(z_h / latent_scale)                    (frozen)
"""

from __future__ import annotations

import torch
from torch import nn

from mordasr.model.adapters import RoutingContext
from mordasr.model.config import ModelConfig
from mordasr.model.estimator import DegradationEstimator, build_vision_tower
from mordasr.model.inject import adapter_layers, inject_adapters, inject_adaptir
from mordasr.model.resample import bicubic_upsample
from mordasr.model.scheduler import one_step_schedule


class OneStepSR(nn.Module):
    def __init__(self, config: ModelConfig, with_adapters: bool = True) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        from mordasr.model.tiny_vae import build_vae

        self.config = config
        self.vae = build_vae(config.vae)
        self.unet = UNet2DConditionModel(**config.unet)
        text = torch.randn(config.num_degradations, 2, config.clip_embed_dim)
        self.estimator = DegradationEstimator(
            build_vision_tower(config.clip_embed_dim, config.clip_vision), text,
            config.temperature, config.router_image_size, trainable_text=config.clip_model_name is None)
        self.register_buffer("null_text", torch.randn(1, config.text_tokens, config.unet["cross_attention_dim"]))
        self.schedule = one_step_schedule(config.scheduler, config.timestep)
        self.routing = RoutingContext()
        self.has_adapters = False
        if with_adapters:
            self.add_adapters()

    # -- adapters --------------------------------------------------------------------------
    def add_adapters(self) -> list[str]:
        """Inject the configured adapters on the encoder (+ quant_conv) and the UNet; freeze the rest."""
        if self.has_adapters:
            raise RuntimeError("adapters already added")
        cfg = self.config.adapter
        d = self.config.num_degradations
        if cfg.kind == "adaptir":  # on the UNet's transformer blocks only, as in the paper
            names = ["unet." + n for n in inject_adaptir(self.unet, cfg.adaptir_ratio, cfg.adaptir_hidden)]
            self.has_adapters = True
            self.freeze_base()
            return names
        names = []
        if cfg.encoder_targets:  # empty: the VAE stays as it is (a UNet-only imported LoRA)
            encoder = inject_adapters(self.vae.encoder, cfg.encoder_targets, cfg, d, self.routing, "vae.encoder.")
            names += ["vae.encoder." + n for n in encoder]
            if getattr(self.vae, "quant_conv", None) is not None:
                names += ["vae." + n for n in inject_adapters(self.vae, ("quant_conv",), cfg, d, self.routing, "vae.")]
        if cfg.unet_targets:
            names += ["unet." + n for n in inject_adapters(self.unet, cfg.unet_targets, cfg, d, self.routing, "unet.")]
        self.has_adapters = True
        self.freeze_base()
        return names

    def freeze_base(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(self.has_adapters and _is_adapter_param(name))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if _is_adapter_param(n)]

    def adapter_layers(self):
        return adapter_layers(self)

    # -- components ------------------------------------------------------------------------
    def estimate(self, x_lr: torch.Tensor) -> torch.Tensor:
        """Degradation scores (N, D) for low-resolution images in [0, 1]."""
        return self.estimator.score_views(DegradationEstimator.view(x_lr, self.config.router_image_size))

    def encode(self, x_lr: torch.Tensor) -> torch.Tensor:
        """Latent mean (scaled) of the bicubic-upsampled low-resolution images in [0, 1]."""
        x = bicubic_upsample(x_lr, self.config.scale) * 2 - 1
        moments = self.vae.encoder(x)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments[:, : self.config.latent_channels] * self.config.latent_scale

    def denoise(self, z_l: torch.Tensor) -> torch.Tensor:
        """UNet noise prediction at the fixed timestep with the fixed text conditioning."""
        text = self.null_text.expand(z_l.shape[0], -1, -1)
        return self.unet(z_l, self.config.timestep, encoder_hidden_states=text).sample

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents."""
        x = self.vae.decode(z_h / self.config.latent_scale).sample
        return ((x + 1) / 2).clamp(0, 1)

    def forward(self, x_lr: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        if scores is None:
            scores = self.estimate(x_lr)
        with self.routing.scores_for(scores):
            z_l = self.encode(x_lr)
            z_h = self.schedule.x0(z_l, self.denoise(z_l))
        return self.decode(z_h)


def _is_adapter_param(name: str) -> bool:
    return any(part in ("lora_A", "lora_B", "router", "adaptir") for part in name.split("."))
