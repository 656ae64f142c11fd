"""Bicubic upsampling by an integer factor, built from ops every TensorRT version parses.

``F.interpolate(mode="bicubic")`` exports as ONNX ``Resize(mode="cubic")``, which the ONNX-TensorRT
operator matrix lists as unsupported (it documents nearest and linear only). For an integer
factor ``s`` each output phase ``p`` reads the same four neighbours with fixed weights, so the
upsample is an edge pad + a convolution with ``s`` output channels (one per phase) + an
interleave, per axis. It reproduces PyTorch's bicubic (A = -0.75, half-pixel centres, border
indices clamped) to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


def _cubic(d: float) -> float:
    d = abs(d)
    a = CUBIC_A
    if d <= 1:
        return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0


def phase_weights(scale: int) -> torch.Tensor:
    """(scale, 5) taps over source offsets -2..2 for each output phase."""
    weights = torch.zeros(scale, 5, dtype=torch.float64)
    for p in range(scale):
        position = (p + 0.5) / scale - 0.5  # source coordinate relative to the centre pixel
        for k, offset in enumerate(range(-2, 3)):
            weights[p, k] = _cubic(position - offset)
    return weights / weights.sum(dim=1, keepdim=True)


def _upsample_last_axis(x: torch.Tensor, scale: int) -> torch.Tensor:
    n, c, h, w = x.shape
    taps = phase_weights(scale).to(x.dtype).reshape(scale, 1, 1, 5)
    y = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 0, 0), mode="replicate")
    y = F.conv2d(y, taps)  # (n*c, scale, h, w): one channel per output phase
    return y.permute(0, 2, 3, 1).reshape(n, c, h, w * scale)


def bicubic_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H*scale, W*scale), equal to ``F.interpolate(..., "bicubic")``."""
    if scale == 1:
        return x
    y = _upsample_last_axis(x, scale)
    return _upsample_last_axis(y.transpose(2, 3), scale).transpose(2, 3)
