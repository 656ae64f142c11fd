"""AdaptIR: parameter-efficient adaptation with a heterogeneous mixture of experts (Guo et al.,
following the published csguoh/AdaptIR code).

For features x (N, d, H, W), ``x = BN(Conv1x1_{d->h}(x))`` with h = d / ratio (24 for IPT), then
three orthogonal branches:

- LIM (local): a depthwise 3x3 conv whose kernel is ``(A[h, r] @ B[r, 9]).view(h, 1, 3, 3)``, r = h/2;
- FAM (frequency): ``rfft2`` (ortho), per-channel affine on magnitude and on phase (init 1 / 0),
  rebuilt spectrum, ``irfft2``, absolute value;
- CGM (channel): softmax spatial attention pooling ``v = x @ softmax(Conv1x1_{h->1}(x))``, then an
  FFN h -> h/2 -> h (GELU) giving a per-channel scale.

Adaptive ensemble: ``y = sigmoid(MLP(GAP(fam))) * lim + sigmoid(Conv1x1_{h->1}(lim)) * fam``
(gates zero-initialised), ``out = Conv1x1_{h->d}(cgm * y)`` with the output conv zero-initialised,
so the adapter starts as an exact no-op. It runs parallel to a transformer block's feed-forward:
``ff(norm(x)) + adaptir(norm(x))``.

``spectral="fft"`` trains through ``torch.fft``; ``"matmul"`` computes the same transforms as
matrix products (``model/spectral.py``) for ONNX/TensorRT. ``fuse()`` folds the BatchNorm into the
head conv and the LIM factors into a plain depthwise kernel, as the exporter wants them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mordasr.model.spectral import angle, irfft2_matmul, irfft2_torch, rfft2_matmul, rfft2_torch

SPECTRAL = ("fft", "matmul")
MIN_HIDDEN = 8  # below this the channel MLP (h -> h/8) would have no units


def hidden_size(d_model: int, ratio: int, hidden: int | None = None) -> int:
    """The adapter's width: ``hidden`` when given (e.g. to match another adapter's parameter
    count), else d_model / ratio."""
    return hidden if hidden is not None else max(MIN_HIDDEN, d_model // ratio)


class AdaptIR(nn.Module):
    def __init__(self, d_model: int, ratio: int = 24, spectral: str = "fft", hidden: int | None = None) -> None:
        super().__init__()
        if spectral not in SPECTRAL:
            raise ValueError(f"spectral must be one of {SPECTRAL}")
        self.spectral = spectral
        self.hidden = h = hidden_size(d_model, ratio, hidden)
        self.rank = h // 2
        self.head = nn.Conv2d(d_model, h, 1)
        self.bn = nn.BatchNorm2d(h)
        self.lim_A = nn.Parameter(torch.empty(h, self.rank))
        self.lim_B = nn.Parameter(torch.empty(self.rank, 9))
        self.lim_bias = nn.Parameter(torch.zeros(h))
        nn.init.kaiming_uniform_(self.lim_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lim_B, a=math.sqrt(5))
        self.amp_fuse = nn.Conv2d(h, h, 1, groups=h)
        self.pha_fuse = nn.Conv2d(h, h, 1, groups=h)
        for conv in (self.amp_fuse, self.pha_fuse):
            nn.init.ones_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.compress = nn.Conv2d(h, 1, 1)
        self.proj = nn.Sequential(nn.Linear(h, h // 2), nn.GELU(), nn.Linear(h // 2, h))
        self.channel_interaction = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(h, h // 8, 1), nn.GELU(),
                                                 nn.Conv2d(h // 8, h, 1))
        nn.init.zeros_(self.channel_interaction[3].weight)
        nn.init.zeros_(self.channel_interaction[3].bias)
        self.spatial_interaction = nn.Conv2d(h, 1, 1)
        nn.init.zeros_(self.spatial_interaction.weight)
        nn.init.zeros_(self.spatial_interaction.bias)
        self.tail = nn.Conv2d(h, d_model, 1, bias=False)
        nn.init.zeros_(self.tail.weight)
        self.fused = False

    # -- branches --------------------------------------------------------------------------
    def lim_kernel(self) -> torch.Tensor:
        return (self.lim_A @ self.lim_B).view(self.hidden, 1, 3, 3)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.lim_fused if self.fused else self.lim_kernel()
        return F.conv2d(x, kernel, self.lim_bias, padding=1, groups=self.hidden)

    def frequency(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if self.spectral == "fft":
            re, im = rfft2_torch(x)
        else:
            re, im = rfft2_matmul(x)
        # sqrt's derivative is infinite at 0: a bin with re = im = 0 (a flat channel) would turn
        # the gradient into NaN (a study run went non-finite at step 155); 1e-12 moves no
        # magnitude above 1e-6 and keeps the fft and matmul paths identical.
        magnitude = torch.sqrt(re * re + im * im + 1e-12)
        phase = angle(re, im)
        magnitude, phase = self.amp_fuse(magnitude), self.pha_fuse(phase)
        re, im = magnitude * torch.cos(phase), magnitude * torch.sin(phase)
        out = irfft2_torch(re, im, h, w) if self.spectral == "fft" else irfft2_matmul(re, im, h, w)
        return out.abs()

    def channel_scale(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        score = F.softmax(self.compress(x).flatten(2), dim=-1)  # (N, 1, HW): where to look
        pooled = (x.flatten(2) * score).sum(-1)  # (N, C)
        return self.proj(pooled).view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.fft and atan2 have no bfloat16 kernels on the CPU, and the magnitude/phase split
        # needs float32's precision (in bfloat16 training goes non-finite within steps): the
        # adapter, a small branch beside its layer, runs in float32 even under autocast.
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x.float()).to(x.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x) if self.fused else self.bn(self.head(x))
        fam = self.frequency(x)
        lim = self.local(x)
        channel_gate = torch.sigmoid(self.channel_interaction(fam))
        spatial_gate = torch.sigmoid(self.spatial_interaction(lim))
        mixed = channel_gate * lim + spatial_gate * fam
        return self.tail(self.channel_scale(x) * mixed)

    # -- export ----------------------------------------------------------------------------
    def fuse(self, spectral: str = "matmul") -> "AdaptIR":
        """Fold the (eval-mode) BatchNorm into the head conv and A @ B into a depthwise kernel, in
        place, and switch the spectral path (``matmul`` for export). Only for inference."""
        if self.fused:
            raise RuntimeError("already fused")
        with torch.no_grad():
            scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            self.head.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = self.head.bias if self.head.bias is not None else torch.zeros_like(scale)
            self.head.bias = nn.Parameter((bias - self.bn.running_mean) * scale + self.bn.bias)
            self.register_buffer("lim_fused", self.lim_kernel().detach().clone())
        self.spectral = spectral
        self.fused = True
        return self

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, rank={self.rank}, spectral={self.spectral}, fused={self.fused}"


class SpatialShape:
    """The (H, W) of the feature map a transformer's tokens came from, set by a pre-hook on the
    ``Transformer2DModel`` (its blocks see (N, HW, C) tokens only)."""

    def __init__(self) -> None:
        self.hw: tuple | None = None

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.hw = (hidden.shape[-2], hidden.shape[-1])


class FeedForwardWithAdaptIR(nn.Module):
    """``ff(x) + adaptir(x)`` on tokens (N, HW, C): the adapter in parallel with the FFN."""

    def __init__(self, ff: nn.Module, dim: int, ratio: int, shape: SpatialShape, hidden: int | None = None) -> None:
        super().__init__()
        self.ff = ff
        for p in self.ff.parameters():
            p.requires_grad_(False)
        self.adaptir = AdaptIR(dim, ratio, hidden=hidden)
        self.shape = shape

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.shape.hw is None:
            raise RuntimeError("AdaptIR needs the feature map's height and width (no hook ran)")
        h, w = self.shape.hw
        n, _, c = x.shape
        spatial = x.transpose(1, 2).reshape(n, c, h, w)
        adapted = self.adaptir(spatial).flatten(2).transpose(1, 2)
        return self.ff(x, *args, **kwargs) + adapted
