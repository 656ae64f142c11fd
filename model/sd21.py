"""The ``sd21`` preset from local weights: a diffusers folder and an open_clip checkpoint.

Nothing is downloaded: ``diffusers_dir`` is a local Stable Diffusion 2.1-base (or SD-Turbo)
folder with ``vae/``, ``unet/`` and, for the null-text conditioning, ``text_encoder/`` and
``tokenizer/`` (read with transformers); ``clip_checkpoint`` is a local open_clip weight file
for the degradation estimator. ``random_weights=True`` builds the same shapes with random
weights for benchmarking; such a model is labelled ``random_weights`` in its checkpoint and in
every bundle exported from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mordasr.errors import CheckpointError
from mordasr.model.config import preset_config
from mordasr.model.estimator import DegradationEstimator, text_embeddings_from_clip
from mordasr.model.onestep import OneStepSR

log = logging.getLogger(__name__)


def _plain_config(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if not k.startswith("_")}


def prompt_embedding(diffusers_dir: str | Path, prompt: str = "", tokens: int = 77) -> torch.Tensor:
    """(1, tokens, dim) text-encoder states of ``prompt`` from a local diffusers folder.

    The exported UNet takes no text input: this one embedding (the empty prompt by default,
    OSEDiff's tag prompt when imported with ``--prompt``) is baked into every graph."""
    from mordasr.lazy import import_optional

    transformers = import_optional("transformers", "reading a text embedding from a diffusers folder")
    CLIPTextModel, CLIPTokenizer = transformers.CLIPTextModel, transformers.CLIPTokenizer
    diffusers_dir = Path(diffusers_dir)
    for sub in ("tokenizer", "text_encoder"):
        if not (diffusers_dir / sub).is_dir():
            raise CheckpointError(f"{diffusers_dir}: no {sub}/ folder (needed for the text embedding)")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one small model: its loading bar is noise on stderr
    tokenizer = CLIPTokenizer.from_pretrained(diffusers_dir, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder", local_files_only=True)
    ids = tokenizer([prompt], padding="max_length", max_length=tokens, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0].float()


def build_sd21(diffusers_dir: str | Path | None = None, clip_checkpoint: str | Path | None = None,
               *, clip_model_name: str | None = None, random_weights: bool = False,
               adapter: str = "mor", null_text: torch.Tensor | None = None,
               adapter_overrides: dict | None = None) -> OneStepSR:
    """An ``sd21`` OneStepSR with adapters, from local weights or random ones.

    ``adapter_overrides`` sets ``AdapterConfig`` fields before the adapters are made (ablations)."""
    config = preset_config("sd21", adapter=adapter)
    for key, value in (adapter_overrides or {}).items():
        setattr(config.adapter, key, value)
    config.adapter.validate()
    if clip_model_name:
        config.clip_model_name = clip_model_name
    if random_weights:
        log.warning("sd21 with RANDOM weights: for latency and memory benchmarks only")
        model = OneStepSR(config, with_adapters=True)
        return model.eval()
    if diffusers_dir is None or clip_checkpoint is None:
        raise CheckpointError("sd21 needs --sd-weights DIR (a local diffusers folder) and "
                              "--clip-weights FILE (a local open_clip checkpoint), or --random-weights")
    diffusers_dir, clip_checkpoint = Path(diffusers_dir), Path(clip_checkpoint)
    for sub in ("vae", "unet"):
        if not (diffusers_dir / sub / "config.json").is_file():
            raise CheckpointError(f"{diffusers_dir}: no {sub}/config.json (not a diffusers model folder)")
    if not clip_checkpoint.is_file():
        raise CheckpointError(f"{clip_checkpoint}: no such open_clip checkpoint")

    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet", local_files_only=True)
    config.vae = _plain_config(vae.config)
    config.unet = _plain_config(unet.config)
    config.latent_scale = float(vae.config.get("scaling_factor", config.latent_scale))
    try:
        clip = open_clip.create_model(config.clip_model_name, pretrained=str(clip_checkpoint))
    except Exception as err:  # open_clip raises RuntimeError, KeyError or AssertionError on a foreign state dict
        raise CheckpointError(f"{clip_checkpoint}: not an open_clip {config.clip_model_name} checkpoint "
                              f"(pass --clip-model-name for another architecture): "
                              f"{str(err).strip().splitlines()[0][:160]}") from None
    clip.eval()
    vision = clip.visual
    clip_cfg = open_clip.get_model_config(config.clip_model_name)
    config.clip_embed_dim = int(clip_cfg["embed_dim"])
    config.clip_vision = dict(clip_cfg["vision_cfg"])
    config.router_image_size = int(vision.image_size[0])
    if null_text is None:
        null_text = prompt_embedding(diffusers_dir, "", config.text_tokens)
    config.text_tokens = int(null_text.shape[1])

    model = OneStepSR(config, with_adapters=False)
    model.vae, model.unet = vae, unet
    text = text_embeddings_from_clip(clip, open_clip.get_tokenizer(config.clip_model_name), config.prompts)
    model.estimator = DegradationEstimator(vision, text, config.temperature, config.router_image_size)
    model.null_text = null_text.reshape(1, *null_text.shape[-2:]).clone()
    model.add_adapters()
    return model.eval()
