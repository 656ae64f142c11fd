"""2-D real FFTs as matrix products, for graphs TensorRT can run.

TensorRT before 11.2 has no ONNX ``DFT``, ONNX Runtime's CUDA provider has none, and the legacy
ONNX exporter cannot export ``torch.fft``. With ``norm="ortho"``, for an (H, W) real image:

    rfft2:  X = F_H x F_W^r / sqrt(HW),  F_N[k, n] = exp(-2 pi i k n / N),  F_W^r: the first W//2+1 columns
    irfft2: x[h, w] = sum_v a_v Re(G[h, v] exp(2 pi i v w / W)) / sqrt(HW),  G = conj(F_H) X,
            a_v = 1 for v = 0 and (even W) v = W/2, else 2 (the Hermitian half counted twice)

The cosine/sine matrices are built in the graph from the input's shape (Range, Floor, Cos, Sin),
so the graph keeps dynamic height and width. ``k * n`` is reduced modulo N before the angle is
formed so float32 keeps the angle exact for any size that fits in float32's 24-bit integers.

Bins that are their own conjugate (v = 0 and, for even sizes, the Nyquist row/column) are real
for a real input; their imaginary part is set to exactly +0 in both the FFT and the matmul paths,
so the phase there is 0 or pi on both, never +pi on one and -pi on the other.
"""

from __future__ import annotations

import math

import torch


def _angles(size_out: int | torch.Tensor, size_in: int | torch.Tensor, n: int | torch.Tensor,
            like: torch.Tensor) -> torch.Tensor:
    """``2 pi ((k * m) mod n) / n`` for k < size_out, m < size_in (float, on ``like``'s device)."""
    k = torch.arange(size_out, device=like.device).to(like.dtype)
    m = torch.arange(size_in, device=like.device).to(like.dtype)
    n = torch.as_tensor(n).to(like.dtype)
    prod = k[:, None] * m[None, :]
    return (prod - n * torch.floor(prod / n)) * (2 * math.pi / n)


def _self_conjugate(h: int | torch.Tensor, w: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(H, W//2+1) mask of the bins that equal their own conjugate for a real input."""
    u = torch.arange(h, device=like.device)
    v = torch.arange(w // 2 + 1, device=like.device)
    row = (u == 0) | (2 * u == h)
    col = (v == 0) | (2 * v == w)
    return row[:, None] & col[None, :]


def rfft2_matmul(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of ``torch.fft.rfft2(x, norm="ortho")`` over the last two dims."""
    h, w = x.shape[-2], x.shape[-1]
    aw = _angles(w, w // 2 + 1, w, x)  # (W, Wr)
    ah = _angles(h, h, h, x)  # (H, H), symmetric
    cw, sw, ch, sh = torch.cos(aw), torch.sin(aw), torch.cos(ah), torch.sin(ah)
    xr, xi = x @ cw, -(x @ sw)  # along W: x F_W^r
    re = ch @ xr + sh @ xi  # along H: (C - iS)(xr + i xi)
    im = ch @ xi - sh @ xr
    scale = torch.rsqrt(torch.as_tensor(h * w).to(x.dtype))
    mask = _self_conjugate(h, w, x)
    return re * scale, torch.where(mask, torch.zeros_like(im), im * scale)


def irfft2_matmul(re: torch.Tensor, im: torch.Tensor, h: int | torch.Tensor, w: int | torch.Tensor) -> torch.Tensor:
    """``torch.fft.irfft2(re + i im, s=(h, w), norm="ortho")``; ``re``/``im`` are (..., h, w//2+1)."""
    ah = _angles(h, h, h, re)
    ch, sh = torch.cos(ah), torch.sin(ah)
    gr = ch @ re - sh @ im  # along H: (C + iS)(re + i im)
    gi = ch @ im + sh @ re
    av = _angles(w // 2 + 1, w, w, re)  # (Wr, W)
    v = torch.arange(w // 2 + 1, device=re.device)
    weight = torch.where((v == 0) | (2 * v == w), torch.ones_like(v), 2 * torch.ones_like(v)).to(re.dtype)
    cos_w, sin_w = torch.cos(av) * weight[:, None], torch.sin(av) * weight[:, None]
    scale = torch.rsqrt(torch.as_tensor(h * w).to(re.dtype))
    return (gr @ cos_w - gi @ sin_w) * scale


def rfft2_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``rfft2_matmul`` through ``torch.fft`` (training; self-conjugate bins real)."""
    spectrum = torch.fft.rfft2(x, dim=(-2, -1), norm="ortho")
    mask = _self_conjugate(x.shape[-2], x.shape[-1], x)
    return spectrum.real, torch.where(mask, torch.zeros_like(spectrum.imag), spectrum.imag)


def irfft2_torch(re: torch.Tensor, im: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.fft.irfft2(torch.complex(re, im), s=(h, w), dim=(-2, -1), norm="ortho")


def angle(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
    """``atan2(im, re)`` from Atan and Where (no Atan2 in ONNX); im = +-0 with re < 0 gives +pi."""
    safe = torch.where(re == 0, torch.ones_like(re), re)
    base = torch.atan(im / safe)
    half_pi = torch.full_like(re, math.pi / 2)
    on_axis = torch.where(im > 0, half_pi, torch.where(im < 0, -half_pi, torch.zeros_like(re)))
    left = torch.where(im >= 0, base + math.pi, base - math.pi)
    return torch.where(re > 0, base, torch.where(re < 0, left, on_axis))
