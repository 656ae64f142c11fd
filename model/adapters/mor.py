"""Mixture of Ranks: each rank-1 pair ``B_i A_i`` is an expert.

``r_shared`` ranks always fire. A per-layer router maps the degradation scores ``s`` (N, D) to
logits over ``r_routed`` experts plus ``n_zero`` zero slots; the top-k slots are kept and their
softmax probabilities renormalised over the k kept slots. A kept zero slot contributes nothing,
so a clean image activates fewer ranks. ``expert_size > 1`` groups the routed ranks into experts
of that many ranks each (a module-level LoRA-MoE, the paper's ablation).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mordasr.model.adapters.base import AdapterLayer, RoutingContext


class MoRLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, *, r_shared: int, r_routed: int, top_k: int,
                 n_zero: int, num_scores: int, alpha: float | None,
                 routing: RoutingContext, expert_size: int = 1) -> None:
        super().__init__(base_layer, r_shared + r_routed, alpha, routing)
        if expert_size < 1 or r_routed % expert_size:
            raise ValueError(f"r_routed={r_routed} must be a multiple of expert_size={expert_size}")
        self.r_shared = r_shared
        self.r_routed = r_routed
        self.expert_size = expert_size
        self.n_experts = r_routed // expert_size
        self.top_k = top_k
        self.n_zero = n_zero
        self.router = nn.Linear(num_scores, self.n_experts + n_zero)
        nn.init.normal_(self.router.weight, std=0.5)
        nn.init.zeros_(self.router.bias)
        # (probs, kept) of the last routed batch, read by the load-balancing loss.
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot_probabilities(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the routed + zero slots, and the mask of the top-k kept slots."""
        probs = torch.softmax(self.router(scores), dim=-1)
        # Threshold at the k-th largest probability instead of scattering top-k indices: the
        # exported graph then holds TopK(constant k) + comparison, which TensorRT runs well.
        kth = torch.topk(probs, self.top_k, dim=-1).values[..., -1:]
        kept = probs >= kth
        return probs, kept

    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        probs, kept = self.slot_probabilities(scores)
        if self.training:
            self.last_routing = (probs, kept)
        chosen = probs * kept
        chosen = chosen / chosen.sum(dim=-1, keepdim=True)
        routed = chosen[..., : self.n_experts]
        if self.expert_size > 1:
            routed = routed.repeat_interleave(self.expert_size, dim=-1)
        if not self.r_shared:
            return routed
        shared = torch.ones(scores.shape[0], self.r_shared, dtype=probs.dtype, device=probs.device)
        return torch.cat([shared, routed], dim=-1)

    def split_shared(self) -> nn.Module:
        """This layer with its shared ranks merged into a copy of the base weight (hybrid export).

        The result routes only the ``r_routed`` ranks; its output equals this layer's for every
        score vector. With no routed ranks the merged base layer itself is returned.
        """
        base = copy.deepcopy(self.base_layer)
        shared_gate = torch.zeros(self.rank, dtype=base.weight.dtype)
        shared_gate[: self.r_shared] = 1
        with torch.no_grad():
            base.weight.add_(self.delta_weight(shared_gate))
        if not self.r_routed:
            return base
        routed = type(self)(base, r_shared=0, r_routed=self.r_routed, top_k=self.top_k,
                            n_zero=self.n_zero, num_scores=self.router.in_features, alpha=None,
                            routing=self.routing, expert_size=self.expert_size)
        routed.scaling = self.scaling  # alpha / (r_shared + r_routed), not alpha / r_routed
        with torch.no_grad():
            routed.lora_A.weight.copy_(self.lora_A.weight[self.r_shared:])
            routed.lora_B.weight.copy_(self.lora_B.weight[:, self.r_shared:])
        routed.router.load_state_dict(self.router.state_dict())
        return routed.to(self.lora_A.weight.device).train(self.training)

    def extra_repr(self) -> str:
        return (f"r_shared={self.r_shared}, r_routed={self.r_routed}, expert_size={self.expert_size}, "
                f"top_k={self.top_k}, n_zero={self.n_zero}, scaling={self.scaling:g}")


def active_ranks(gate: torch.Tensor) -> torch.Tensor:
    """Number of ranks that spend compute for each gate vector (..., rank)."""
    return (gate != 0).sum(dim=-1)
