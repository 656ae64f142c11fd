"""Adapter layers sharing one vocabulary: ``gate(scores)``, ``delta_weight(gate)``,
``merge(gate)``, ``unmerge()``, ``forward(x)`` (peft's LoRA layer style)."""

from mordasr.model.adapters.base import AdapterLayer, RoutingContext
from mordasr.model.adapters.lora import LoRAConv2d, LoRALinear
from mordasr.model.adapters.mor import MoRConv2d, MoRLayer, MoRLinear

__all__ = ["AdapterLayer", "LoRAConv2d", "LoRALinear", "MoRConv2d", "MoRLayer", "MoRLinear", "RoutingContext"]
