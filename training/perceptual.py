"""The perceptual half of ``L_rec``: LPIPS when its weights are a local file, else a fallback.

``LPIPS`` mirrors the ``lpips`` package's VGG variant (Zhang et al., 2018) down to its state-dict
names, so ``torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.pth")`` on a machine with
internet gives a file this loads with ``strict=True`` (backbone and linear heads together). Nothing
is downloaded here. Without a file, ``StructuralLoss`` (1 - SSIM plus an L1 on Sobel gradients:
both need no weights) stands in, and the trainer logs which one is in use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mordasr.errors import CheckpointError

log = logging.getLogger(__name__)

VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2 ... relu5_3
VGG_CHANNELS = (64, 128, 256, 512, 512)


class _ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _VGGSlices(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features
        for i, (start, stop) in enumerate(VGG_SLICES, 1):
            block = nn.Sequential()
            for j in range(start, stop):
                block.add_module(str(j), features[j])
            setattr(self, f"slice{i}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(1, len(VGG_SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            out.append(x)
        return out


class _Linear(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS-VGG distance (N,) of images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGGSlices()
        for i, channels in enumerate(VGG_CHANNELS):
            setattr(self, f"lin{i}", _Linear(channels))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"LPIPS weights {path} do not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad file
            raise CheckpointError(f"{path}: not a torch state dict ({err})") from None
        model = cls()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise CheckpointError(f"{path}: not LPIPS-VGG weights ({first}); save "
                                  "lpips.LPIPS(net='vgg').state_dict()") from None
        return model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.net(self.scaling_layer(a * 2 - 1))
        fb = self.net(self.scaling_layer(b * 2 - 1))
        total = 0
        for i, (x, y) in enumerate(zip(fa, fb)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((x - y) ** 2).mean(dim=(2, 3))
        return total.flatten()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (N,) of images in [0, 1] (Gaussian 11x11 window, sigma 1.5)."""
    c = a.shape[1]
    window = _gaussian_window().to(a).expand(c, 1, 11, 11)
    pad = 5

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), window, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=(1, 2, 3))


def _sobel(x: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=x.shape[1])


class StructuralLoss(nn.Module):
    """Weight-free stand-in for LPIPS: (1 - SSIM) + L1 of Sobel gradients, per image (N,)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gradient = (_sobel(a) - _sobel(b)).abs().mean(dim=(1, 2, 3))
        return (1 - ssim(a, b)) + gradient


def perceptual_loss(lpips_weights: str | Path | None) -> tuple[nn.Module, str]:
    """The module and its name for the log: ``lpips-vgg (FILE)`` or the structural fallback."""
    if lpips_weights:
        module = LPIPS.from_file(lpips_weights)
        return module, f"lpips-vgg ({lpips_weights})"
    return StructuralLoss(), "structural fallback (1 - SSIM + Sobel L1; no LPIPS weights given)"
