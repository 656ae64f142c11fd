"""Adapter layers sharing one vocabulary: ``gate(scores)``, ``delta_weight(gate)``,
``merge(gate)``, ``unmerge()``, ``forward(x)`` (peft's LoRA layer style)."""

from mordasr.model.adapters.base import AdapterLayer, RoutingContext
from mordasr.model.adapters.lora import LoRALayer
from mordasr.model.adapters.mor import MoRLayer

__all__ = ["AdapterLayer", "LoRALayer", "MoRLayer", "RoutingContext"]
