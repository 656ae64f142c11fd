"""LoRA weights saved by peft or by diffusers, for a UNet and/or a VAE encoder.

Accepted, one or more per import (a UNet adapter and a VAE adapter may sit in two files):

* peft: a folder with ``adapter_model.safetensors`` and ``adapter_config.json`` (``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), keys
  ``base_model.model.<module>.lora_A.weight``;
* diffusers: ``pytorch_lora_weights.safetensors`` (or its folder), keys ``unet.<module>.lora_A.weight``
  (or the older ``<module>.lora.down.weight`` / ``lora_linear_layer.down``), with the LoraConfig
  in the file's ``lora_adapter_metadata`` when diffusers wrote one; without it, diffusers' own
  loader uses alpha = rank (scaling 1), and so does this one, unless ``<module>.alpha`` tensors
  give it.

The module decides the component: UNet names start with ``conv_in``, ``down_blocks``, ... and VAE
names with ``encoder``/``quant_conv``; a ``unet.``/``vae.`` prefix is taken when present.
Text-encoder LoRAs, DoRA and kohya-style keys are refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from mordasr.errors import CheckpointError
from mordasr.model.importers.lora_weights import ImportedLoRA, LoRAWeights

PEFT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
UNET_ROOTS = ("conv_in", "time_embedding", "time_proj", "down_blocks", "mid_block", "up_blocks",
              "conv_norm_out", "conv_out", "add_embedding", "class_embedding", "encoder_hid_proj")
# (down, up) suffixes of one LoRA pair: peft's, and diffusers' older two
_PAIR = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?|lora\.(?P<du>down|up)"
                   r"|lora_linear_layer\.(?P<du2>down|up))\.weight$")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in PEFT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {' or '.join(PEFT_FILES)} in this folder")
    raise CheckpointError(f"{path}: no such file or folder")


def _read(file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the LoRA config (adapter_config.json beside it, or the safetensors metadata)."""
    from safetensors import safe_open

    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: give the .safetensors file (pickled .bin LoRA files are not read)")
    try:
        with safe_open(str(file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{file}: unreadable safetensors file ({str(err).splitlines()[0][:160]})") from None
    config_file = file.parent / "adapter_config.json"
    if file.name == "adapter_model.safetensors" and config_file.is_file():
        try:
            return tensors, {"": json.loads(config_file.read_text())}
        except ValueError as err:
            raise CheckpointError(f"{config_file}: invalid JSON ({err})") from None
    if "lora_adapter_metadata" in metadata:  # diffusers: {"unet.r": 4, "unet.lora_alpha": 8, ...}
        flat = json.loads(metadata["lora_adapter_metadata"])
        configs: dict[str, dict] = {}
        for key, value in flat.items():
            prefix, _, field = key.partition(".")
            configs.setdefault(prefix, {})[field] = value
        return tensors, configs
    return tensors, {}


def _split(key: str) -> tuple[str, str]:
    """(component, module name inside it) of a tensor key, prefixes removed."""
    key = key.removeprefix("base_model.model.")  # peft's PeftModel wrapper
    head = key.split(".", 1)[0]
    if head in ("unet", "vae"):
        return head, key.split(".", 1)[1]
    if head in ("text_encoder", "text_encoder_2"):
        raise CheckpointError(f"{key}: a text-encoder LoRA; the exported UNet takes one baked prompt embedding, "
                              "so mordasr imports UNet and VAE-encoder LoRAs only")
    if head in VAE_ROOTS:
        return "vae", key
    if head in UNET_ROOTS:
        return "unet", key
    raise CheckpointError(f"{key}: neither a UNet nor a VAE module name")


def _alpha(config: dict, module: str, rank: int, alphas: dict[str, float]) -> float:
    if module in alphas:
        return alphas[module]
    if not config:
        return float(rank)  # diffusers without metadata: alpha = rank, scaling 1
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = float(value)
    if config.get("use_rslora"):  # scaling alpha / sqrt(r), i.e. alpha * sqrt(r) over r
        alpha *= math.sqrt(rank)
    return alpha


def _expected_rank(config: dict, module: str) -> int | None:
    if "r" not in config:
        return None
    rank = int(config["r"])
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            rank = int(value)
    return rank


def _add_file(lora: ImportedLoRA, file: Path) -> None:
    tensors, configs = _read(file)
    for prefix, config in configs.items():
        if config.get("use_dora"):
            raise CheckpointError(f"{file}: a DoRA adapter (use_dora); only plain LoRA folds into the base weights")
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}  # component -> module -> alpha (kohya-style .alpha tensors)
    for key, tensor in tensors.items():
        if key.startswith(("lora_unet_", "lora_te")):
            raise CheckpointError(f"{file}: {key} is a kohya-style key; convert the file to diffusers' format first")
        if key.endswith(".alpha"):
            component, module = _split(key[: -len(".alpha")])
            alphas.setdefault(component, {})[module] = float(tensor.item())
            continue
        if "lora_magnitude_vector" in key:
            raise CheckpointError(f"{file}: {key} is a DoRA tensor; only plain LoRA folds into the base weights")
        match = _PAIR.match(key)
        if match is None:
            raise CheckpointError(f"{file}: {key} is not a LoRA tensor of a known format "
                                  "(peft lora_A/lora_B, diffusers lora.down/lora.up)")
        component, module = _split(match["module"])
        part = match["ab"] or {"down": "A", "up": "B"}[match["du"] or match["du2"]]
        if part in pairs.setdefault((component, module), {}):
            raise CheckpointError(f"{file}: two lora_{part} tensors for {component}.{module} (several adapters "
                                  "in one file; save one)")
        pairs[(component, module)][part] = tensor.float()
    if not pairs:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    for (component, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"{file}: {component}.{module} has lora_{''.join(pair)} but not its pair")
        config = configs.get("", configs.get(component, {}))
        rank = int(pair["A"].shape[0])
        expected = _expected_rank(config, module)
        if expected is not None and expected != rank:
            raise CheckpointError(f"{file}: the config says r = {expected} for {module} but its tensors have "
                                  f"rank {rank}")
        target = lora.unet if component == "unet" else lora.vae
        if module in target:
            raise CheckpointError(f"{file}: {component}.{module} also comes from another file")
        target[module] = LoRAWeights(pair["A"], pair["B"], _alpha(config, module, rank, alphas.get(component, {})))


def read_peft(paths: list[str | Path]) -> ImportedLoRA:
    """LoRA weights from one or more peft/diffusers files or folders."""
    files = [_weights_file(Path(p)) for p in paths]
    lora = ImportedLoRA(source={"format": "peft", "files": [f.name for f in files]})
    for file in files:
        _add_file(lora, file)
    ranks = sorted({w.rank for w in lora.modules().values()})
    lora.source["ranks"] = ranks
    return lora
