"""Degradation-aware load-balancing loss (MoR-DASR).

``L_bal = N * sum_i alpha_i f_i p_i`` over the N = r_routed + n_zero slots of every MoR layer,
with ``f_i`` the fraction of top-k picks that went to slot i and ``p_i`` its mean router
probability. ``alpha_i = alpha`` for real experts and ``s * alpha`` for zero slots, with ``s``
the batch's mean overall-degradation score: the worse the images, the more it costs to skip
ranks. Averaged over layers.
"""

from __future__ import annotations

import torch
from torch import nn

from mordasr.model.adapters.mor import MoRLayer


def load_balance_loss(model: nn.Module, severity: torch.Tensor, alpha: float = 1.0,
                      degradation_aware: bool = True) -> torch.Tensor:
    """Mean over MoR layers of the degradation-aware balance loss of their last routed batch.

    ``severity`` is the per-image overall degradation score (N,), in [0, 1].
    ``degradation_aware=False`` is the standard balance loss (every slot weighted ``alpha``).
    """
    losses = []
    for module in model.modules():
        if not isinstance(module, MoRLayer) or module.last_routing is None:
            continue
        probs, kept = module.last_routing
        slots = probs.shape[-1]
        f = kept.float().mean(dim=0) / module.top_k
        p = probs.mean(dim=0)
        weights = torch.full((slots,), alpha, dtype=probs.dtype, device=probs.device)
        if degradation_aware:
            weights[module.n_experts:] = alpha * severity.mean().to(probs.dtype)
        losses.append(slots * (weights * f * p).sum())
    if not losses:
        return severity.new_zeros(())
    return torch.stack(losses).mean()


def clear_routing(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, MoRLayer):
            module.last_routing = None
