"""Model configuration: presets ``tiny`` and ``sd21``, saved as JSON next to the weights.

Shaped after diffusers' configs: plain data, ``to_dict``/``from_dict``, and the diffusers
constructors take the nested ``vae``/``unet`` dictionaries as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The 7 degradation dimensions and their (positive, negative) prompts. Score = P(negative),
# so a higher score means a worse image along that dimension.
DEGRADATION_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("quality", "a high quality photo", "a low quality photo"),
    ("blur", "a sharp photo", "a blurry photo"),
    ("noise", "a clean photo", "a noisy photo"),
    ("resolution", "a high resolution photo", "a low resolution photo"),
    ("edges", "a photo with sharp edges", "a photo with blurry edges"),
    ("detail", "a photo with fine details", "a photo without details"),
    ("compression", "an uncompressed photo", "a photo with compression artifacts"),
)

# OSEDiff's LoRA placement (target-module name suffixes).
ENCODER_TARGETS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out",
                   "to_q", "to_k", "to_v", "to_out.0")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
                "conv_out", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

ADAPTER_KINDS = ("mor", "lora", "adaptir")


@dataclass
class AdapterConfig:
    """Mixture-of-Ranks (``mor``), dense ``lora`` of the same total rank, or ``adaptir``.

    Paper defaults: 40 ranks = 8 shared + 32 routed, top-8, 4 zero slots. AdaptIR sits parallel
    to the feed-forward of every UNet transformer block, with hidden width d / ``adaptir_ratio``.
    """

    kind: str = "mor"
    r_shared: int = 8
    r_routed: int = 32
    top_k: int = 8
    n_zero: int = 4
    alpha: float | None = None  # LoRA alpha; scaling = alpha / rank (None: alpha = rank)
    encoder_targets: tuple[str, ...] = ENCODER_TARGETS
    unet_targets: tuple[str, ...] = UNET_TARGETS
    adaptir_ratio: int = 24  # AdaptIR hidden width = d_model / ratio (24 in the paper's IPT setup)
    adaptir_hidden: int | None = None  # an explicit AdaptIR hidden width instead (to match a parameter budget)
    expert_size: int = 1  # MoR ranks per routed expert (>1: module-level LoRA-MoE ablation)
    # Dense LoRA only, as peft's LoraConfig: per-module rank and alpha, keyed by the adapted
    # module's full name in OneStepSR ("unet.conv_in", "vae.encoder.conv_in", "vae.quant_conv").
    # Imported checkpoints (mordasr-import) use them when ranks differ between the UNet and the VAE.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.r_shared + self.r_routed

    def rank_of(self, module: str) -> int:
        return int(self.rank_pattern.get(module, self.rank))

    def alpha_of(self, module: str) -> float | None:
        return self.alpha_pattern.get(module, self.alpha)

    def validate(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"adapter kind must be one of {ADAPTER_KINDS}, got {self.kind!r}")
        if self.rank <= 0:
            raise ValueError("adapter rank must be positive")
        if (self.rank_pattern or self.alpha_pattern) and self.kind != "lora":
            raise ValueError("rank_pattern and alpha_pattern apply to dense LoRA adapters only")
        if any(int(r) <= 0 for r in self.rank_pattern.values()):
            raise ValueError("every rank in rank_pattern must be positive")
        if self.kind == "mor" and (self.expert_size < 1 or self.r_routed % self.expert_size):
            raise ValueError(f"r_routed={self.r_routed} must be a multiple of expert_size={self.expert_size}")
        slots = self.r_routed // max(self.expert_size, 1) + self.n_zero
        if self.kind == "mor" and not 0 < self.top_k <= slots:
            raise ValueError(f"top_k={self.top_k} must lie in 1..{slots} (routed experts + zero slots)")


@dataclass
class ModelConfig:
    preset: str
    scale: int
    vae: dict[str, Any]
    unet: dict[str, Any]
    clip_vision: dict[str, Any]  # open_clip CLIPVisionCfg fields, or {"type": "conv", ...} (tiny)
    clip_embed_dim: int
    clip_model_name: str | None  # open_clip model name when real CLIP weights are used
    router_image_size: int
    text_tokens: int  # length of the fixed (null) text conditioning
    latent_scale: float
    timestep: int = 999
    scheduler: dict[str, Any] = field(default_factory=lambda: {
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear"})
    temperature: float = 100.0  # CLIP logit scale applied to the cosines
    prompts: tuple[tuple[str, str, str], ...] = DEGRADATION_PROMPTS
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    @property
    def num_degradations(self) -> int:
        return len(self.prompts)

    @property
    def latent_channels(self) -> int:
        return int(self.vae["latent_channels"])

    @property
    def latent_downsample(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        from mordasr.records import from_dict

        config = from_dict(cls, data, "model config")
        config.adapter.validate()
        return config

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tiny() -> ModelConfig:
    return ModelConfig(
        preset="tiny",
        scale=4,
        # Memory linear in pixels: no attention in the autoencoder and, in the UNet, only in the
        # mid block at 1/8 of the latent grid (1/16 of the output). A /2 latent of 8 channels (8
        # values per 12 pixel values) lets an autoencoder this small reconstruct held-out
        # photographs above 32 dB; model/tiny_vae.py says why it is not diffusers' AutoencoderKL.
        vae=dict(type="tiny", in_channels=3, out_channels=3, latent_channels=8,
                 block_out_channels=(32, 48), layers_per_block=(1, 2)),
        unet=dict(sample_size=32, in_channels=8, out_channels=8, layers_per_block=1,
                  block_out_channels=(48, 64, 96, 96),
                  down_block_types=("DownBlock2D",) * 4,
                  up_block_types=("UpBlock2D",) * 4,
                  mid_block_type="UNetMidBlock2DCrossAttn",
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16),
        clip_vision=dict(type="conv", width=32),
        clip_embed_dim=32,
        clip_model_name=None,
        router_image_size=64,
        text_tokens=4,
        latent_scale=1.0,
        # A tiny UNet trained from scratch cannot predict noise precisely enough for the x0
        # step at t=999, which divides its error by sqrt(a_999) = 0.068 (x14.6). At t=10,
        # z_h = 1.005 z_l - 0.099 eps: the latent passes through nearly unchanged (the UNet's
        # GroupNorms could not carry a tile's mean colour through eps) and the UNet, whose
        # output convolution starts at zero, learns the correction. Same update, same graphs,
        # constants read from the manifest.
        timestep=10,
        # CLIP's logit scale of 100 saturates the score sigmoid of an estimator fitted from
        # scratch (its BCE stalled above 1.0 here); 10 lets the tiny tower learn.
        temperature=10.0,
        adapter=AdapterConfig(r_shared=2, r_routed=8, top_k=2, n_zero=2),
    )


def _sd21() -> ModelConfig:
    # Stable Diffusion 2.1-base / SD-Turbo shapes.
    return ModelConfig(
        preset="sd21",
        scale=4,
        vae=dict(in_channels=3, out_channels=3,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, sample_size=512),
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True),
        clip_vision=dict(layers=12, width=768, patch_size=16, image_size=224),
        clip_embed_dim=512,
        clip_model_name="ViT-B-16",
        router_image_size=224,
        text_tokens=77,
        latent_scale=0.18215,
    )


PRESETS = {"tiny": _tiny, "sd21": _sd21}


def preset_config(name: str, adapter: str | None = None) -> ModelConfig:
    """A fresh config for a named preset, optionally with another adapter kind."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    if adapter is not None:
        config.adapter.kind = adapter
    config.adapter.validate()
    return config
