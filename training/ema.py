"""An exponential moving average of a module's trainable weights.

SR training keeps one (BasicSR's ``ema_decay`` 0.999 is the common choice): the weights at the
end of a run sit wherever the last steps' noise left them, and their running mean lies nearer the
bottom of the basin, the same effect a mean of fine-tuned copies has ("model soups",
``training/average.py``) along a single trajectory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class WeightEMA:
    """``shadow = decay * shadow + (1 - decay) * weight`` after every optimizer step, for the
    parameters that were trainable when it was made; ``applied`` swaps it in for a while."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.reset(module)

    def reset(self, module: torch.nn.Module) -> None:
        """Start the average again from ``module``'s trainable weights as they are now."""
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """``module`` holds the averaged weights inside the block and its own ones again after it."""
        params = dict(module.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("EMA state: its tensors are not this module's trainable weights")
        for name, value in state.items():
            self.shadow[name].copy_(value)
