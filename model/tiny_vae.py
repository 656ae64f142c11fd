"""The ``tiny`` preset's autoencoder: AutoencoderKL's interface, built to train fast and tile cleanly.

Same interface as diffusers' ``AutoencoderKL`` where mordasr uses it (``encoder`` -> moments,
``quant_conv``, ``decode(z).sample`` through ``post_quant_conv`` and ``decoder``), so the encoder
takes adapters, exports and quantises exactly as SD's does. What differs, and why:

- **No normalisation layers.** GroupNorm removes each group's mean over the whole tile; in a VAE
  this small (2 channels per group) that is the image's colour, which the decoder then has to
  guess back (measured: a 2-level AutoencoderKL stalled at 17 dB after 400 steps and greyed
  colours). Without norms every output pixel depends on a bounded neighbourhood only, so a
  tiled restore equals the whole-image one away from the tile borders.
- **A linear path beside the deep one**: a 2x2 stride-2 convolution from pixels to moments and its
  transpose from latents to pixels, so the identity-like part of the mapping is learnt at once and
  the residual blocks (whose second convolution starts at zero) add detail on top.
- **No attention**: memory and time linear in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecoderOutput:
    sample: torch.Tensor


class ResBlock(nn.Module):
    """x + conv2(silu(conv1(silu(x)))); conv2 starts at zero, so the block starts as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class TinyEncoder(nn.Module):
    def __init__(self, in_channels: int, latent_channels: int, widths: tuple[int, int],
                 blocks: tuple[int, int]) -> None:
        super().__init__()
        fine, coarse = widths
        self.conv_in = nn.Conv2d(in_channels, fine, 3, padding=1)
        self.fine = nn.Sequential(*[ResBlock(fine) for _ in range(blocks[0])])
        self.down = nn.Conv2d(fine, coarse, 2, stride=2)
        self.coarse = nn.Sequential(*[ResBlock(coarse) for _ in range(blocks[1])])
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(coarse, 2 * latent_channels, 3, padding=1)
        self.conv_skip = nn.Conv2d(in_channels, 2 * latent_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.coarse(self.down(self.fine(self.conv_in(x))))
        return self.conv_out(self.act(h)) + self.conv_skip(x)


class TinyDecoder(nn.Module):
    def __init__(self, out_channels: int, latent_channels: int, widths: tuple[int, int],
                 blocks: tuple[int, int]) -> None:
        super().__init__()
        fine, coarse = widths
        self.conv_in = nn.Conv2d(latent_channels, coarse, 3, padding=1)
        self.coarse = nn.Sequential(*[ResBlock(coarse) for _ in range(blocks[1])])
        self.up = nn.ConvTranspose2d(coarse, fine, 2, stride=2)
        self.fine = nn.Sequential(*[ResBlock(fine) for _ in range(blocks[0])])
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(fine, out_channels, 3, padding=1)
        self.conv_skip = nn.ConvTranspose2d(latent_channels, out_channels, 2, stride=2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fine(self.up(self.coarse(self.conv_in(z))))
        return self.conv_out(self.act(h)) + self.conv_skip(z)


class TinyAutoencoder(nn.Module):
    """Latent at 1/2 resolution (``block_out_channels`` has two widths: full and half resolution)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 8,
                 block_out_channels: tuple[int, int] = (32, 48), layers_per_block: tuple[int, int] = (1, 2)) -> None:
        super().__init__()
        widths = tuple(block_out_channels)
        blocks = tuple(layers_per_block)
        if len(widths) != 2 or len(blocks) != 2:
            raise ValueError("the tiny autoencoder has two levels: two block_out_channels and two layers_per_block")
        self.encoder = TinyEncoder(in_channels, latent_channels, widths, blocks)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = TinyDecoder(out_channels, latent_channels, widths, blocks)

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(self.decoder(self.post_quant_conv(z)))


def build_vae(config: dict) -> nn.Module:
    """The preset's autoencoder: ``type: tiny`` builds ``TinyAutoencoder``, else diffusers' AutoencoderKL."""
    cfg = dict(config)
    if cfg.pop("type", "kl") == "tiny":
        return TinyAutoencoder(**cfg)
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg)
