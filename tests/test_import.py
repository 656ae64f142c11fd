"""mordasr-import: OSEDiff and peft/diffusers LoRA checkpoints, made the way their own code makes
them (peft adapters on small diffusers models of the SD layout), imported, exported in dense-lora
mode and checked in ONNX Runtime against the peft-adapted PyTorch model."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

pytest.importorskip("peft")
pytest.importorskip("transformers")

from mordasr.model.importers.cli import main as import_cli  # noqa: E402
from mordasr.tests.sd_folder import CLIP_NAME, fake_sd_folder  # noqa: E402

PARITY_TOL = 1e-4  # max |ONNX Runtime - peft PyTorch| on [0, 1] pixels (the bound)
UNET_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
             "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
VAE_GREP = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


# -- OSEDiff's public training code (osediff.py: initialize_unet, initialize_vae, save_model) ----------
def osediff_unet_groups(unet) -> tuple[list[str], list[str], list[str]]:
    encoder, decoder, others = [], [], []
    for n, _ in unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in UNET_GREP:
            if pattern in n and ("down_blocks" in n or "conv_in" in n):
                encoder.append(n.replace(".weight", ""))
                break
            elif pattern in n and ("up_blocks" in n or "conv_out" in n):
                decoder.append(n.replace(".weight", ""))
                break
            elif pattern in n:
                others.append(n.replace(".weight", ""))
                break
    return encoder, decoder, others


def osediff_vae_modules(vae) -> list[str]:
    modules = []
    for n, _ in vae.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for pattern in VAE_GREP:
            if pattern in n and ("encoder" in n):
                modules.append(n.replace(".weight", ""))
            elif ("quant_conv" in n) and ("post_quant_conv" not in n):
                modules.append(n.replace(".weight", ""))
    return modules


def _trained(module, seed: int, conv_in: bool = True) -> None:
    """Stand-in for training: peft's gaussian init leaves lora_B at zero, which would hide mistakes.
    OSEDiff also retrains the UNet's conv_in in full (``conv_in``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif conv_in and name.startswith("conv_in."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def osediff_models(sd: Path, rank_unet: int = 4, rank_vae: int = 2):
    """The UNet and VAE with peft adapters exactly as OSEDiff attaches them, 'trained'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae")
    groups = osediff_unet_groups(unet)
    for names, adapter in zip(groups, ("default_encoder", "default_decoder", "default_others")):
        unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=names),
                         adapter_name=adapter)
    unet.set_adapters(["default_encoder", "default_decoder", "default_others"])
    vae_modules = osediff_vae_modules(vae)
    vae.add_adapter(LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=vae_modules),
                    adapter_name="default_encoder")
    _trained(unet, 1)
    _trained(vae, 2)
    checkpoint = {"vae_lora_encoder_modules": vae_modules, "unet_lora_encoder_modules": groups[0],
                  "unet_lora_decoder_modules": groups[1], "unet_lora_others_modules": groups[2],
                  "rank_unet": rank_unet, "rank_vae": rank_vae,
                  "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
                  "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k or "skip" in k}}
    return unet.eval(), vae.eval(), checkpoint


def text_embedding(sd: Path, prompt: str) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd, subfolder="text_encoder")
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    return encoder(ids)[0]


@torch.no_grad()
def osediff_forward(unet, vae, text: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """OSEDiff_test.forward on a bicubic x4 input, with the latent mean (mordasr's deterministic choice)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False)  # SD 2.1-base's scheduler_config.json
    scheduler.set_timesteps(timesteps=[999])  # OSEDiff: one step from t=999 to the x0 estimate
    x = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False) * 2 - 1
    latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    eps = unet(latent, torch.tensor([999]), encoder_hidden_states=text).sample
    denoised = scheduler.step(eps, torch.tensor([999]), latent, return_dict=True).prev_sample
    out = vae.decode(denoised / vae.config.scaling_factor).sample.clamp(-1, 1)
    return (out + 1) / 2


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return fake_sd_folder(tmp_path_factory.mktemp("sd"), text_encoder=True)


@pytest.fixture(scope="module")
def osediff_case(sd, tmp_path_factory):
    folder, _ = sd
    unet, vae, checkpoint = osediff_models(folder)
    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    torch.save(checkpoint, path)
    return unet, vae, checkpoint, path


def run_import(args: list[str], sd) -> object:
    folder, clip = sd
    return CliRunner().invoke(import_cli, [*args, "--sd-weights", str(folder), "--clip-weights", str(clip),
                                           "--clip-model-name", CLIP_NAME, "-q"])


def export_and_restore(checkpoint: Path, bundle: Path, lr: np.ndarray) -> np.ndarray:
    from mordasr.export.cli import main as export_cli
    from mordasr.runtime import Restorer

    result = CliRunner().invoke(export_cli, [str(checkpoint), "-o", str(bundle), "--mode", "dense-lora", "-q"])
    assert result.exit_code == 0, result.output
    return Restorer(bundle).restore(lr).image


LR = np.random.default_rng(0).uniform(0, 1, (16, 16, 3)).astype(np.float32)


def _reference(unet, vae, sd, prompt: str = "") -> np.ndarray:
    text = text_embedding(sd[0], prompt)
    out = osediff_forward(unet, vae, text, torch.from_numpy(LR.transpose(2, 0, 1))[None])
    return out[0].numpy().transpose(1, 2, 0)


# -- parity -----------------------------------------------------------------------------------------
def test_osediff_import_exports_to_onnx_matching_peft(osediff_case, sd, tmp_path):
    unet, vae, checkpoint, path = osediff_case
    result = run_import(["osediff", str(path), "-o", str(tmp_path / "ckpt"), "--prompt", "a photo"], sd)
    assert result.exit_code == 0, result.output
    restored = export_and_restore(tmp_path / "ckpt", tmp_path / "bundle", LR)
    reference = _reference(unet, vae, sd, "a photo")
    error = np.abs(restored - reference).max()
    print(f"\nOSEDiff import, ONNX Runtime vs peft PyTorch: max abs {error:.2e}")
    assert error < PARITY_TOL, error
    unet.disable_adapters()
    vae.disable_adapters()
    try:  # the adapters matter: the base alone is far from the adapted output
        assert np.abs(_reference(unet, vae, sd, "a photo") - reference).max() > 100 * PARITY_TOL
    finally:
        unet.enable_adapters()
        vae.enable_adapters()
    from mordasr.runtime import load_manifest

    manifest = load_manifest(tmp_path / "bundle")
    assert manifest.mode == "dense-lora" and manifest.source["text_conditioning"]["prompt"] == "a photo"


def test_osediff_import_maps_every_tensor(osediff_case, sd, tmp_path):
    """Each imported tensor lands in exactly one mordasr parameter, and each one moves the output
    (a non-zero gradient for every LoRA tensor), so no key is silently dropped."""
    from mordasr.model.io import load_checkpoint

    unet, vae, checkpoint, path = osediff_case
    assert run_import(["osediff", str(path), "-o", str(tmp_path / "ckpt")], sd).exit_code == 0
    model, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["kind"] == "imported" and meta["imported"]["format"] == "osediff"
    params = dict(model.named_parameters())
    expected = {}
    for component, state in (("unet", checkpoint["state_dict_unet"]), ("vae", checkpoint["state_dict_vae"])):
        for key, tensor in state.items():
            for adapter in ("default_encoder", "default_decoder", "default_others"):
                key = key.replace(f".{adapter}.", ".")
            expected[f"{component}.{key}"] = tensor
    assert set(expected) <= set(params)
    for name, tensor in expected.items():
        assert torch.equal(params[name].detach(), tensor), name
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert len(lora) == sum(1 for k in expected if "lora_" in k)  # nothing extra except vae.quant_conv's pair
    for p in lora.values():
        p.requires_grad_(True)
    params["unet.conv_in.base_layer.weight"].requires_grad_(True)
    out = model(torch.from_numpy(LR.transpose(2, 0, 1))[None], torch.zeros(1, model.config.num_degradations))
    out.square().sum().backward()
    dead = [n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead[:5]
    assert params["unet.conv_in.base_layer.weight"].grad.abs().sum() > 0
    # scaling: peft's default alpha 8 over each rank
    layers = dict(model.adapter_layers())
    assert layers["unet.conv_in"].scaling == 8 / 4 and layers["vae.encoder.conv_in"].scaling == 8 / 2


def test_changing_one_tensor_in_the_file_changes_the_import(osediff_case, sd, tmp_path):
    from mordasr.model.io import load_checkpoint

    _, _, checkpoint, _ = osediff_case
    x = torch.from_numpy(LR.transpose(2, 0, 1))[None]
    outputs = []
    keys = ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.default_others.weight",
            "up_blocks.1.resnets.0.conv_shortcut.lora_A.default_decoder.weight"]
    for i, key in enumerate([None, *keys]):
        edited = {**checkpoint, "state_dict_unet": dict(checkpoint["state_dict_unet"])}
        if key is not None:
            edited["state_dict_unet"][key] = edited["state_dict_unet"][key] + 0.5
        torch.save(edited, tmp_path / f"{i}.pkl")
        assert run_import(["osediff", str(tmp_path / f"{i}.pkl"), "-o", str(tmp_path / f"c{i}")], sd).exit_code == 0
        model, _ = load_checkpoint(tmp_path / f"c{i}")
        with torch.no_grad():
            outputs.append(model(x, torch.zeros(1, model.config.num_degradations)))
    assert all((outputs[0] - o).abs().max() > 1e-4 for o in outputs[1:])


def test_peft_and_diffusers_files_import_with_their_scaling(sd, tmp_path):
    """A UNet LoRA saved in diffusers' format (metadata: r 4, alpha 16) and a VAE-encoder LoRA
    saved by peft (r 2, alpha 3, rank_pattern 3 on conv_in) import together and match peft."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    folder, _ = sd
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet_config = LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian",
                             target_modules=sum(osediff_unet_groups(unet), []))
    unet.add_adapter(unet_config)
    _trained(unet, 3, conv_in=False)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "unet_lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet_config.to_dict())
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    vae_config = LoraConfig(r=2, lora_alpha=3, rank_pattern={"encoder.conv_in": 3},
                            target_modules=sorted(set(osediff_vae_modules(vae))))
    peft_vae = get_peft_model(vae, vae_config)
    _trained(peft_vae, 4)
    peft_vae.save_pretrained(tmp_path / "vae_lora")
    result = run_import(["peft", str(tmp_path / "unet_lora"), str(tmp_path / "vae_lora"),
                         "-o", str(tmp_path / "ckpt")], sd)
    assert result.exit_code == 0, result.output
    restored = export_and_restore(tmp_path / "ckpt", tmp_path / "bundle", LR)
    reference = _reference(unet.eval(), peft_vae.base_model.model.eval(), sd)
    error = np.abs(restored - reference).max()
    print(f"\npeft + diffusers import, ONNX Runtime vs peft PyTorch: max abs {error:.2e}")
    assert error < PARITY_TOL, error


# -- refusals: one line, exit 2, nothing written ------------------------------------------------------
def _refused(result, out: Path, match: str) -> None:
    assert result.exit_code == 2, result.output
    assert match in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_refuses_a_checkpoint_of_neither_format(sd, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "x.pkl")
    _refused(run_import(["osediff", str(tmp_path / "x.pkl"), "-o", str(tmp_path / "o")], sd), tmp_path / "o",
             "not an OSEDiff checkpoint")
    from safetensors.torch import save_file

    save_file({"unet.foo.weight": torch.zeros(2)}, tmp_path / "pytorch_lora_weights.safetensors")
    _refused(run_import(["peft", str(tmp_path / "pytorch_lora_weights.safetensors"), "-o", str(tmp_path / "o")], sd),
             tmp_path / "o", "not a LoRA tensor of a known format")


def test_refuses_a_rank_that_disagrees_with_the_tensors(osediff_case, sd, tmp_path):
    *_, checkpoint, _ = osediff_case
    torch.save({**checkpoint, "rank_unet": 8}, tmp_path / "x.pkl")
    _refused(run_import(["osediff", str(tmp_path / "x.pkl"), "-o", str(tmp_path / "o")], sd), tmp_path / "o",
             "rank_unet = 8 but")
    names = list(checkpoint["unet_lora_others_modules"])
    torch.save({**checkpoint, "unet_lora_others_modules": names[1:]}, tmp_path / "y.pkl")
    _refused(run_import(["osediff", str(tmp_path / "y.pkl"), "-o", str(tmp_path / "o")], sd), tmp_path / "o",
             "module lists do not name")


def test_refuses_a_base_of_other_shapes(osediff_case, tmp_path):
    *_, path = osediff_case
    other = fake_sd_folder(tmp_path, text_encoder=True, unet_width=24)
    _refused(run_import(["osediff", str(path), "-o", str(tmp_path / "o")], other), tmp_path / "o",
             "another base model")


def test_refuses_an_untrusted_pickle(osediff_case, sd, tmp_path):
    *_, checkpoint, _ = osediff_case
    torch.save({**checkpoint, "args": argparse.Namespace(lr=1)}, tmp_path / "x.pkl")
    _refused(run_import(["osediff", str(tmp_path / "x.pkl"), "-o", str(tmp_path / "o")], sd), tmp_path / "o",
             "refused to unpickle")


@pytest.mark.slow
def test_import_cli_as_a_subprocess(osediff_case, sd, tmp_path):
    folder, clip = sd
    *_, path = osediff_case
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "mordasr.model.importers.cli"]
    assert "baked" in subprocess.run([*args, "--help"], capture_output=True, text=True, env=env).stdout
    done = subprocess.run([*args, "osediff", str(path), "--sd-weights", str(folder), "--clip-weights", str(clip),
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env)
    # the open_clip test architecture is registered in this process only: the subprocess names the
    # default one and is refused on the checkpoint's shapes, cleanly
    assert done.returncode == 2 and not (tmp_path / "o").exists(), done.stderr
    assert done.stderr.strip().startswith("mordasr-import: error:")


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("MORDASR_SD21_DIR") and os.environ.get("MORDASR_OSEDIFF_CKPT")
                         and os.environ.get("MORDASR_CLIP_CKPT")),
                    reason="needs MORDASR_SD21_DIR (SD 2.1-base diffusers folder), MORDASR_OSEDIFF_CKPT "
                           "(osediff.pkl) and MORDASR_CLIP_CKPT (open_clip ViT-B-16); no weights can be "
                           "downloaded here")
def test_real_osediff_import_end_to_end(tmp_path):
    sd_dir, ckpt, clip = (os.environ[k] for k in ("MORDASR_SD21_DIR", "MORDASR_OSEDIFF_CKPT", "MORDASR_CLIP_CKPT"))
    result = CliRunner().invoke(import_cli, ["osediff", ckpt, "--sd-weights", sd_dir, "--clip-weights", clip,
                                             "-o", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401  (the reference below loads them)

    unet, vae, checkpoint = osediff_models(Path(sd_dir))  # peft layout of the same base
    for model, state in ((unet, torch.load(ckpt, weights_only=True)["state_dict_unet"]),
                         (vae, torch.load(ckpt, weights_only=True)["state_dict_vae"])):
        model.load_state_dict(state, strict=False)
    lr = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    restored = export_and_restore(tmp_path / "ckpt", tmp_path / "bundle", lr)
    reference = osediff_forward(unet, vae, text_embedding(Path(sd_dir), ""),
                                torch.from_numpy(lr.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
    assert np.abs(restored - reference).max() < 1e-3  # SD 2.1 in FP32 through ORT: accumulation order


@pytest.mark.parametrize("key, match", [
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "text-encoder LoRA"),
    ("unet.conv_in.lora_magnitude_vector", "DoRA"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "kohya"),
])
def test_peft_reader_refuses_what_cannot_fold(tmp_path, key, match):
    from safetensors.torch import save_file

    from mordasr.errors import CheckpointError
    from mordasr.model.importers.peft_files import read_peft

    save_file({key: torch.zeros(2, 2)}, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(CheckpointError, match=match):
        read_peft([tmp_path])


def test_refuses_a_v_prediction_base(osediff_case, sd, tmp_path):
    import json
    import shutil

    folder, clip = sd
    *_, path = osediff_case
    shutil.copytree(folder, tmp_path / "sd")
    (tmp_path / "sd" / "scheduler").mkdir()
    (tmp_path / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"}))
    _refused(run_import(["osediff", str(path), "-o", str(tmp_path / "o")], (tmp_path / "sd", clip)),
             tmp_path / "o", "prediction_type 'v_prediction'")
