"""Dense LoRA: every rank always fires (the baseline MoR is compared with)."""

from __future__ import annotations

import torch

from mordasr.model.adapters.base import AdapterLayer


class LoRALayer(AdapterLayer):
    """Dense LoRA on an ``nn.Linear`` or ``nn.Conv2d`` (A has the base kernel, B is 1x1)."""

    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones(scores.shape[0], self.rank, dtype=scores.dtype, device=scores.device)

