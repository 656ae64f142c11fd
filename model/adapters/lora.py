"""Dense LoRA: every rank always fires (the baseline MoR is compared with)."""

from __future__ import annotations

import torch

from mordasr.model.adapters.base import AdapterLayer


class LoRALayer(AdapterLayer):
    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones(scores.shape[0], self.rank, dtype=scores.dtype, device=scores.device)


class LoRALinear(LoRALayer):
    """Dense LoRA on an ``nn.Linear``."""


class LoRAConv2d(LoRALayer):
    """Dense LoRA on an ``nn.Conv2d`` (A has the base kernel, B is 1x1)."""
