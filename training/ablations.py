"""``mordasr-train fit``'s models: the adapters of each ablation (``run.ablation``) on the base."""

from __future__ import annotations

import torch

from mordasr.errors import MordasrError
from mordasr.model import OneStepSR
from mordasr.training.paper_config import FitConfig


# run.ablation -> (adapter kind, AdapterConfig changes, degradation-aware balance)
def ablation_settings(ablation: str, adapter: str, r_routed: int) -> tuple[str, dict, bool]:
    if ablation == "dense-lora":
        return "lora", {}, True
    if ablation == "lora-moe":  # 4 LoRA experts of r_routed/4 ranks, top-2, no shared ranks or zero slots
        experts = 4 if r_routed % 4 == 0 else 2
        return "mor", {"expert_size": r_routed // experts, "n_zero": 0, "top_k": 2}, True
    if ablation == "mor-no-zero":
        return "mor", {"n_zero": 0}, True
    if ablation == "mor-std-balance":
        return "mor", {}, False
    return adapter, {}, True


def build_model(cfg: FitConfig) -> tuple[OneStepSR, bool, dict]:
    from mordasr.model.io import base_path, load_checkpoint

    r = cfg.run
    torch.manual_seed(r.seed)  # every rank makes the same adapters
    if r.preset == "sd21":
        from mordasr.model.config import preset_config
        from mordasr.model.sd21 import build_sd21

        kind, changes, aware = ablation_settings(r.ablation, r.adapter, preset_config("sd21").adapter.r_routed)
        model = build_sd21(r.sd_weights, r.clip_weights, random_weights=r.random_weights, adapter=kind,
                           adapter_overrides=changes)
        return model, aware, {"random_weights": r.random_weights}
    model, meta = load_checkpoint(base_path(r.base), add_adapters=False)
    if model.has_adapters:
        raise MordasrError(f"{r.base} already holds adapters; start from a base checkpoint")
    if model.config.preset != r.preset:
        raise MordasrError(f"{r.base} is a {model.config.preset} checkpoint, the config says preset {r.preset}")
    kind, changes, aware = ablation_settings(r.ablation, r.adapter, model.config.adapter.r_routed)
    model.config.adapter.kind = kind
    for key, value in changes.items():
        setattr(model.config.adapter, key, value)
    model.config.adapter.validate()
    model.add_adapters()
    return model, aware, {"random_weights": bool(meta.get("random_weights"))}
