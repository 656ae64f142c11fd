"""Put adapter layers on target modules by name suffix (OSEDiff's placement), and take them off."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from mordasr.model.adapters import AdapterLayer, LoRALayer, MoRLayer, RoutingContext
from mordasr.model.config import AdapterConfig


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def make_adapter(base: nn.Module, config: AdapterConfig, num_scores: int,
                 routing: RoutingContext, name: str = "") -> AdapterLayer:
    """The configured adapter around ``base``; ``name`` (its full name) looks up per-module ranks."""
    if config.kind == "lora":
        return LoRALayer(base, config.rank_of(name), config.alpha_of(name), routing)
    return MoRLayer(base, r_shared=config.r_shared, r_routed=config.r_routed, top_k=config.top_k,
               n_zero=config.n_zero, num_scores=num_scores, alpha=config.alpha, routing=routing,
               expert_size=config.expert_size)


def inject_adapters(root: nn.Module, targets: Iterable[str], config: AdapterConfig,
                    num_scores: int, routing: RoutingContext, prefix: str = "") -> list[str]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` under ``root`` whose name ends with a target.

    Returns the names of the adapted modules. Grouped convolutions are left alone. ``prefix`` is
    ``root``'s own name in the model, for per-module ranks (``AdapterConfig.rank_pattern``).
    """
    targets = tuple(targets)
    adapted = []
    for name, module in list(root.named_modules()):
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make_adapter(module, config, num_scores, routing, prefix + name))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no module matched the adapter targets {targets}")
    return adapted


def inject_adaptir(unet: nn.Module, ratio: int, hidden: int | None = None) -> list[str]:
    """Put an AdaptIR module parallel to the feed-forward of every transformer block of ``unet``.

    Each ``Transformer2DModel`` gets a pre-hook that records its input's (H, W): its blocks see
    flattened tokens and AdaptIR works on the feature map.
    """
    from diffusers.models.attention import BasicTransformerBlock

    from mordasr.model.adapters.adaptir import FeedForwardWithAdaptIR, SpatialShape

    adapted = []
    for name, module in list(unet.named_modules()):
        blocks = getattr(module, "transformer_blocks", None)
        if blocks is None:
            continue
        shape = SpatialShape()
        module.register_forward_pre_hook(shape.hook, with_kwargs=True)
        for i, block in enumerate(blocks):
            if isinstance(block, BasicTransformerBlock):
                block.ff = FeedForwardWithAdaptIR(block.ff, block.dim, ratio, shape, hidden)
                adapted.append(f"{name}.transformer_blocks.{i}.ff")
    if not adapted:
        raise ValueError("the UNet has no transformer blocks to put AdaptIR on")
    return adapted


def fuse_adaptir(root: nn.Module) -> nn.Module:
    """A copy of ``root`` whose AdaptIR modules are fused for export (matmul DFT, BN and LIM folded)."""
    from mordasr.model.adapters.adaptir import AdaptIR

    fused = copy.deepcopy(root).eval()
    for module in fused.modules():
        if isinstance(module, AdaptIR):
            module.fuse("matmul")
    return fused


def adapter_layers(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in root.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def hybrid_adapters(root: nn.Module) -> nn.Module:
    """A copy of ``root`` whose MoR layers have their shared ranks merged into the base weights.

    Only the routed ranks stay as a gated low-rank branch: the ``hybrid`` export mode.
    """
    hybrid = copy.deepcopy(root)
    for name, layer in list(adapter_layers(hybrid)):
        if not isinstance(layer, MoRLayer):
            raise ValueError(f"{name}: hybrid export needs Mixture-of-Ranks adapters, "
                             f"found {type(layer).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = hybrid.get_submodule(parent_name) if parent_name else hybrid
        setattr(parent, child, layer.split_shared())
    return hybrid


def strip_adapters(root: nn.Module) -> nn.Module:
    """A copy of ``root`` with every adapter removed (the frozen base: VSD's pretrained teacher)."""
    from mordasr.model.adapters.adaptir import FeedForwardWithAdaptIR

    base = copy.deepcopy(root)
    for name, module in list(base.named_modules()):
        if isinstance(module, (AdapterLayer, FeedForwardWithAdaptIR)):
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            setattr(parent, child, module.base_layer if isinstance(module, AdapterLayer) else module.ff)
    return base


def fold_adapters(root: nn.Module, scores: torch.Tensor) -> nn.Module:
    """A copy of ``root`` whose adapters are merged for one score vector (D,) and removed.

    The result has exactly the base architecture (plain ``nn.Linear``/``nn.Conv2d`` with the
    base module names), which is what a folded engine holds.
    """
    folded = copy.deepcopy(root)
    scores = scores.reshape(1, -1)
    for name, layer in list(adapter_layers(folded)):
        with torch.no_grad():
            gate = layer.gate(scores.to(layer.base_layer.weight.dtype))[0]
        layer.merge(gate)
        parent_name, _, child = name.rpartition(".")
        parent = folded.get_submodule(parent_name) if parent_name else folded
        setattr(parent, child, layer.base_layer)
    return folded
