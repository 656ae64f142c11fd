"""The learning-rate schedule every mordasr trainer uses: linear warmup, then cosine to 0."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR``: the factor rises linearly over ``warmup`` steps, then follows half a cosine from
    1 to 0 over the remaining ``total - warmup`` (and stays at 0 past ``total``)."""
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
