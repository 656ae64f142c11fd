"""Adversarial loss: a multi-scale patch discriminator on images, hinge or non-saturating.

Each scale is a small PatchGAN (strided convs, spectral norm for stability) run on the image
downsampled by 2**i; its logits are averaged. The discriminator has its own optimizer and is
updated after the generator on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

GAN_LOSSES = ("hinge", "non-saturating")


class PatchDiscriminator(nn.Module):
    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [spectral_norm(nn.Conv2d(3, channels, 4, 2, 1)), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(layers - 1):
            blocks += [spectral_norm(nn.Conv2d(width, width * 2, 4, 2, 1)), nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(spectral_norm(nn.Conv2d(width, 1, 3, 1, 1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, scales: int = 2, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.heads = nn.ModuleList(PatchDiscriminator(channels, layers) for _ in range(scales))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for i, head in enumerate(self.heads):
            logits.append(head(F.avg_pool2d(x, 2 ** i) if i else x))
        return logits


def generator_adversarial_loss(logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":
        return torch.stack([-x.mean() for x in logits]).mean()
    return torch.stack([F.softplus(-x).mean() for x in logits]).mean()


def discriminator_loss(real: list[torch.Tensor], fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "hinge":
        terms = [F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)]
    else:
        terms = [F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real, fake)]
    return torch.stack(terms).mean()
