"""OSEDiff checkpoints, as its public training code writes them (``OSEDiff_gen.save_model``).

``torch.save`` of a dict::

    rank_unet, rank_vae                      LoRA ranks (ints)
    unet_lora_{encoder,decoder,others}_modules  module names of the three UNet adapter groups
    vae_lora_encoder_modules                 module names of the VAE's adapter
    state_dict_unet                          every UNet tensor whose name holds "lora" or "conv_in":
                                             <m>.lora_A.default_encoder.weight, ...,
                                             conv_in.base_layer.weight/bias (conv_in is retrained)
    state_dict_vae                           every VAE tensor whose name holds "lora" (or "skip")

The adapters were made by peft's ``LoraConfig(r=rank, init_lora_weights="gaussian",
target_modules=...)`` with peft's default ``lora_alpha`` of 8, so scaling = 8 / rank unless a fork
changed it (``alpha``). The file is read with ``torch.load(weights_only=True)``: tensors, strings,
numbers, lists and dicts only, never arbitrary pickled code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from mordasr.errors import CheckpointError
from mordasr.model.importers.lora_weights import ImportedLoRA, LoRAWeights

PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig.lora_alpha's default; OSEDiff does not set it
UNET_GROUPS = {"unet_lora_encoder_modules": "default_encoder", "unet_lora_decoder_modules": "default_decoder",
               "unet_lora_others_modules": "default_others"}
VAE_GROUPS = {"vae_lora_encoder_modules": "default_encoder"}
REQUIRED_KEYS = ("rank_unet", "state_dict_unet", *UNET_GROUPS)


def load_trusted_dict(path: Path) -> dict:
    """``torch.load`` with ``weights_only=True``: refuses pickles that would run code."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unsupported global"
        raise CheckpointError(f"{path}: refused to unpickle it: it holds Python objects beyond tensors, "
                              f"numbers, strings, lists and dicts ({reason[:160]}); mordasr loads checkpoints "
                              "with torch.load(weights_only=True) only") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not a checkpoint dict")
    return data


def is_osediff(data: dict) -> bool:
    return all(key in data for key in REQUIRED_KEYS)


def _module_list(data: dict, key: str) -> list[str]:
    names = data.get(key, [])
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{key} is not a list of module names")
    return list(dict.fromkeys(names))  # OSEDiff's VAE list repeats quant_conv once per pattern


def _rank(data: dict, key: str) -> int:
    rank = data.get(key)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CheckpointError(f"{key} = {rank!r} is not a positive rank")
    return rank


def _group(state: dict, names: list[str], adapter: str, rank: int, rank_key: str, alpha: float,
           component: str) -> dict[str, LoRAWeights]:
    out = {}
    for name in names:
        keys = (f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight")
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"state_dict_{component} lacks {missing[0]} (listed in its module list)")
        down, up = state[keys[0]], state[keys[1]]
        if down.shape[0] != rank or up.shape[1] != rank:
            raise CheckpointError(f"{rank_key} = {rank} but {component}.{name} has rank "
                                  f"{down.shape[0]} (lora_A) / {up.shape[1]} (lora_B)")
        out[name] = LoRAWeights(down.float(), up.float(), alpha)
    return out


def _unclaimed(state: dict, claimed: set[str], component: str) -> None:
    stray = sorted(k for k in state if "lora" in k and k not in claimed)
    if stray:
        raise CheckpointError(f"state_dict_{component} has LoRA tensors for modules its module lists do not "
                              f"name, e.g. {stray[0]} ({len(stray)} tensors)")


def read_osediff(path: str | Path, alpha: float | None = None) -> ImportedLoRA:
    """The LoRA weights and the retrained ``conv_in`` of an OSEDiff checkpoint."""
    path = Path(path)
    data = load_trusted_dict(path)
    if not is_osediff(data):
        raise CheckpointError(f"{path}: not an OSEDiff checkpoint (it lacks "
                              f"{', '.join(k for k in REQUIRED_KEYS if k not in data)})")
    alpha = PEFT_DEFAULT_ALPHA if alpha is None else float(alpha)
    unet_state, vae_state = data["state_dict_unet"], data.get("state_dict_vae", {})
    for name, state in (("state_dict_unet", unet_state), ("state_dict_vae", vae_state)):
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: {name} is not a dict of tensors")
    rank_unet = _rank(data, "rank_unet")
    lora = ImportedLoRA(source={"format": "osediff", "file": path.name, "rank_unet": rank_unet, "alpha": alpha})
    for key, adapter in UNET_GROUPS.items():
        lora.unet.update(_group(unet_state, _module_list(data, key), adapter, rank_unet, "rank_unet", alpha, "unet"))
    vae_names = _module_list(data, "vae_lora_encoder_modules")
    if vae_names:
        rank_vae = _rank(data, "rank_vae")
        lora.source["rank_vae"] = rank_vae
        lora.vae.update(_group(vae_state, vae_names, "default_encoder", rank_vae, "rank_vae", alpha, "vae"))
    claimed = {f"{m}.lora_{ab}.{adapter}.weight" for key, adapter in UNET_GROUPS.items()
               for m in _module_list(data, key) for ab in "AB"}
    _unclaimed(unet_state, claimed, "unet")
    _unclaimed(vae_state, {f"{m}.lora_{ab}.default_encoder.weight" for m in vae_names for ab in "AB"}, "vae")
    skips = [k for k in vae_state if "skip" in k]
    if skips:
        raise CheckpointError(f"state_dict_vae holds skip-connection weights ({skips[0]}): a VAE with skip "
                              "convolutions is not the SD 2.1 layout mordasr exports")
    for param in ("weight", "bias"):  # conv_in is retrained in full; peft keeps it under base_layer
        for key in (f"conv_in.base_layer.{param}", f"conv_in.{param}"):
            if key in unet_state:
                lora.replaced[f"unet.conv_in.{param}"] = unet_state[key].float()
                break
    return lora
