"""Foreign LoRA weights, read into one shape, and the mordasr ``dense-lora`` model built from them.

Readers (``osediff.py``, ``peft_files.py``) turn a checkpoint into ``ImportedLoRA``: per adapted
module its down (A) and up (B) tensors as peft stores them and its alpha, keyed by the module's
name in the diffusers model (``down_blocks.0.resnets.0.conv1`` in the UNet, ``encoder.conv_in``
or ``quant_conv`` in the AutoencoderKL), plus whole base tensors the checkpoint replaces (OSEDiff
retrains the UNet's ``conv_in``). ``build_imported_model`` puts them on the ``sd21`` preset:

    peft / OSEDiff                          mordasr (OneStepSR)
    unet.<m>.lora_A[.<adapter>].weight  ->  unet.<m>.lora_A.weight
    unet.<m>.lora_B[.<adapter>].weight  ->  unet.<m>.lora_B.weight
    vae.encoder.<m>.lora_A/B...         ->  vae.encoder.<m>.lora_A/B.weight
    vae.quant_conv.lora_A/B...          ->  vae.quant_conv.lora_A/B.weight
    unet.conv_in.base_layer.weight/bias ->  unet.conv_in.base_layer.weight/bias (replaced)
    scaling = lora_alpha / r            ->  AdapterLayer.scaling = alpha / rank

Both compute ``W x + scaling * B(A(x))`` with A of the base layer's kernel, stride and padding and
B a 1x1 convolution (or linear), so the tensors copy over unchanged.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mordasr.errors import CheckpointError


@dataclass
class LoRAWeights:
    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class ImportedLoRA:
    """LoRA weights of a UNet and/or a VAE encoder, keyed by diffusers module names."""

    source: dict  # format, file, ranks, alpha: recorded in the checkpoint's meta
    unet: dict[str, LoRAWeights] = field(default_factory=dict)
    vae: dict[str, LoRAWeights] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # "unet.conv_in.weight" -> tensor

    def modules(self) -> dict[str, LoRAWeights]:
        """Every adapted module under its full OneStepSR name (``unet.…``, ``vae.…``)."""
        return {**{f"unet.{m}": w for m, w in self.unet.items()}, **{f"vae.{m}": w for m, w in self.vae.items()}}

    def check(self) -> None:
        if not self.unet and not self.vae:
            raise CheckpointError("no LoRA tensors found for the UNet or the VAE encoder")
        for name, w in self.modules().items():
            if w.up.shape[1] != w.rank:
                raise CheckpointError(f"{name}: lora_A has rank {w.rank} but lora_B has {w.up.shape[1]}")
        outside = [m for m in self.vae if not (m.startswith("encoder.") or m == "quant_conv")]
        if outside:
            raise CheckpointError(f"VAE LoRA on {outside[0]}: mordasr adapts the VAE encoder and quant_conv "
                                  "only (the decoder stays frozen)")


def adapter_overrides(lora: ImportedLoRA) -> dict:
    """``AdapterConfig`` fields that place exactly these adapters: exact module names as targets,
    the most common rank and alpha as defaults, the others as per-module patterns."""
    modules = lora.modules()
    rank = Counter(w.rank for w in modules.values()).most_common(1)[0][0]
    alpha = Counter(w.alpha for w in modules.values()).most_common(1)[0][0]
    encoder = tuple(m[len("encoder."):] for m in lora.vae if m.startswith("encoder."))
    if "quant_conv" in lora.vae and not encoder:
        raise CheckpointError("a VAE LoRA on quant_conv alone is not supported: mordasr adapts quant_conv "
                              "together with the encoder")
    return {"kind": "lora", "r_shared": rank, "r_routed": 0, "alpha": float(alpha),
            "encoder_targets": encoder, "unet_targets": tuple(lora.unet),
            "rank_pattern": {n: w.rank for n, w in modules.items() if w.rank != rank},
            "alpha_pattern": {n: float(w.alpha) for n, w in modules.items() if w.alpha != alpha}}


def _copy(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise CheckpointError(f"{what}: the checkpoint's tensor is {tuple(source.shape)} but the base folder's "
                              f"layer needs {tuple(target.shape)} (a LoRA trained on another base model?)")
    with torch.no_grad():
        target.copy_(source.to(target.dtype))


def _check_scheduler(sd_dir: Path) -> None:
    """The exported x0 step is ``(z - sqrt(1 - a) eps) / sqrt(a)`` with SD 2.1-base's betas: a base
    whose scheduler predicts v (SD 2.1-768) or uses other betas would be exported wrong."""
    from mordasr.model.config import preset_config

    file = sd_dir / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return
    config = json.loads(file.read_text())
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{file}: prediction_type {config['prediction_type']!r}; mordasr's one-step "
                              "update is for epsilon-prediction bases (SD 2.1-base, SD-Turbo)")
    expected = preset_config("sd21").scheduler
    differs = [k for k, v in expected.items() if k in config and config[k] != v]
    if differs:
        raise CheckpointError(f"{file}: {differs[0]} = {config[differs[0]]!r}, but the sd21 preset's one-step "
                              f"update uses {expected[differs[0]]!r}")


def build_imported_model(lora: ImportedLoRA, sd_dir: str | Path, clip_weights: str | Path,
                         clip_model_name: str | None = None, prompt: str = ""):
    """An ``sd21`` OneStepSR with dense LoRA adapters carrying ``lora``'s tensors.

    The base comes from the local diffusers folder ``sd_dir``; the degradation estimator from the
    open_clip checkpoint (it routes nothing in dense-lora mode, but the runtime reports its
    scores); the UNet's text conditioning is ``prompt``'s embedding from the folder's text encoder.
    """
    from mordasr.model.adapters import AdapterLayer
    from mordasr.model.sd21 import build_sd21, prompt_embedding

    lora.check()
    _check_scheduler(Path(sd_dir))
    text = prompt_embedding(sd_dir, prompt)
    try:
        model = build_sd21(sd_dir, clip_weights, clip_model_name=clip_model_name, null_text=text,
                           adapter="lora", adapter_overrides=adapter_overrides(lora))
    except ValueError as err:  # no module of the base matched a target list
        raise CheckpointError(f"{err}: the LoRA does not fit the base folder's model") from None
    layers = dict(model.adapter_layers())
    wanted = lora.modules()
    missing = sorted(set(wanted) - set(layers))
    if missing:
        raise CheckpointError(f"{missing[0]}: no such Linear/Conv2d layer in the base folder's model "
                              f"({len(missing)} of {len(wanted)} LoRA modules missing; a LoRA for another base?)")
    for name, w in wanted.items():
        layer = layers[name]
        assert isinstance(layer, AdapterLayer)
        _copy(layer.lora_A.weight, w.down, f"{name}.lora_A")
        _copy(layer.lora_B.weight, w.up, f"{name}.lora_B")
    state = model.state_dict()
    for key, tensor in lora.replaced.items():
        module, _, param = key.rpartition(".")
        target = f"{module}.base_layer.{param}" if module in layers else key
        if target not in state:
            raise CheckpointError(f"{key}: the base folder's model has no such tensor")
        _copy(state[target], tensor, key)
    return model.eval()
