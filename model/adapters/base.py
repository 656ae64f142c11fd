"""The low-rank adapter shared by dense LoRA and Mixture-of-Ranks.

``y = W0 x + scaling * B diag(g) A x``: each rank ``i`` (the rank-1 pair ``B_i A_i``) is
scaled by its gate ``g_i``. Dense LoRA gates every rank with 1; MoR computes the gates from the
per-image degradation scores. Because the gates depend on the image's scores and not on tokens,
``W0 + scaling * B diag(g) A`` is an exact fold for one score vector.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch
from torch import nn


class RoutingContext:
    """How one call's degradation scores (N, D) reach the adapter layers of a model.

    Diffusers modules pass no extra arguments to their sub-layers, so the scores travel with the
    call instead: ``with routing.scores_for(scores): model.encode(x)`` makes them visible to every
    adapter layer of that model for the duration of the block, in that thread (or task) only. Two
    calls in flight at once -- threads of a server, a test beside another -- never see each
    other's scores, and a layer run outside any such block fails instead of reusing stale ones.
    """

    def __init__(self) -> None:
        self._scores: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("scores", default=None)

    # A copied or unpickled model gets its own context (shared by its own layers), never a call's scores.
    def __deepcopy__(self, memo: dict) -> "RoutingContext":
        return RoutingContext()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    @contextlib.contextmanager
    def scores_for(self, scores: torch.Tensor) -> Iterator[None]:
        token = self._scores.set(scores)
        try:
            yield
        finally:
            self._scores.reset(token)

    @property
    def scores(self) -> torch.Tensor:
        scores = self._scores.get()
        if scores is None:
            raise RuntimeError("no degradation scores for this call: run the adapted model inside "
                               "routing.scores_for(scores) (OneStepSR.forward does)")
        return scores


class AdapterLayer(nn.Module):
    """Wraps a frozen ``nn.Linear`` or ``nn.Conv2d`` with a rank-``rank`` low-rank branch."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float | None,
                 routing: RoutingContext) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError("grouped convolutions are not adapted")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.routing = routing
        if isinstance(base_layer, nn.Linear):
            self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        elif isinstance(base_layer, nn.Conv2d):
            self.lora_A = nn.Conv2d(base_layer.in_channels, rank, base_layer.kernel_size,
                                    base_layer.stride, base_layer.padding, base_layer.dilation,
                                    bias=False, padding_mode=base_layer.padding_mode)
            self.lora_B = nn.Conv2d(rank, base_layer.out_channels, 1, bias=False)
        else:
            raise TypeError(f"cannot adapt {type(base_layer).__name__}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.merged_gate: torch.Tensor | None = None

    # -- routing ---------------------------------------------------------------------------
    def gate(self, scores: torch.Tensor) -> torch.Tensor:
        """Gate vector (N, rank) for degradation scores (N, D)."""
        raise NotImplementedError

    def current_gate(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        scores = self.routing.scores
        if scores.shape[0] != batch:
            scores = scores.expand(batch, -1)
        return self.gate(scores.to(like.dtype))

    # -- weights ---------------------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def delta_weight(self, gate: torch.Tensor) -> torch.Tensor:
        """``scaling * B diag(gate) A`` in the base weight's shape, for one gate vector (rank,)."""
        if gate.dim() != 1 or gate.shape[0] != self.rank:
            raise ValueError(f"expected one gate vector of length {self.rank}, got {tuple(gate.shape)}")
        b = self.lora_B.weight.reshape(self.lora_B.weight.shape[0], self.rank) * gate
        a = self.lora_A.weight
        if self.is_conv:
            delta = torch.einsum("or,rikl->oikl", b, a)
        else:
            delta = b @ a
        return delta * self.scaling

    def merge(self, gate: torch.Tensor) -> None:
        """Fold ``delta_weight(gate)`` into the base weight (checked for non-finite values)."""
        if self.merged_gate is not None:
            raise RuntimeError("already merged; unmerge() first")
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = weight + self.delta_weight(gate.to(weight.dtype)).to(weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError("merging produced non-finite weights")
            weight.copy_(merged)
        self.merged_gate = gate.detach().clone()

    def unmerge(self) -> None:
        if self.merged_gate is None:
            raise RuntimeError("not merged")
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.sub_(self.delta_weight(self.merged_gate.to(weight.dtype)).to(weight.dtype))
        self.merged_gate = None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged_gate is not None:
            return y
        gate = self.current_gate(x.shape[0], x)
        h = self.lora_A(x)
        if self.is_conv:
            h = h * gate[:, :, None, None]
        else:
            h = h * gate.reshape(gate.shape[0], *([1] * (h.dim() - 2)), self.rank)
        return y + self.lora_B(h) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"
