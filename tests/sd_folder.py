"""A local diffusers folder of the SD layout with tiny widths and random weights, and an open_clip
checkpoint for it: what the sd21 preset and mordasr-import read, small enough for a unit test."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_NAME = "mordasr-test-clip"
CROSS_DIM = 24


def _tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 2 + 2 * i, 3 + 2 * i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                              model_max_length=77)
    tokenizer.save_pretrained(folder / "sd" / "tokenizer")


def fake_sd_folder(tmp_path: Path, text_encoder: bool = False, unet_width: int = 16,
                   seed: int = 0) -> tuple[Path, Path]:
    """(diffusers folder, open_clip checkpoint); ``text_encoder`` adds text_encoder/ and tokenizer/."""
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    folder = tmp_path / "sd"
    AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                  scaling_factor=0.5).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=8, block_out_channels=(unet_width, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
                         attention_head_dim=4, norm_num_groups=8,
                         use_linear_projection=True).save_pretrained(folder / "unet")
    if text_encoder:
        from transformers import CLIPTextConfig, CLIPTextModel

        _tokenizer(tmp_path)
        config = CLIPTextConfig(vocab_size=54, hidden_size=CROSS_DIM, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                eos_token_id=1, pad_token_id=1)
        CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / f"{CLIP_NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{CLIP_NAME}.json")
    clip = open_clip.create_model(CLIP_NAME)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    return folder, tmp_path / "clip.pt"
