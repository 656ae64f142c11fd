"""The sd21 preset: loading from local weights (tiny stand-ins here) and real shapes (slow)."""

from __future__ import annotations

import pytest
import torch

from mordasr.errors import CheckpointError
from mordasr.model.sd21 import build_sd21
from mordasr.tests.sd_folder import fake_sd_folder


def test_build_sd21_from_local_folders(tmp_path):
    folder, clip_file = fake_sd_folder(tmp_path)
    null_text = torch.randn(1, 5, 24)
    model = build_sd21(folder, clip_file, clip_model_name="mordasr-test-clip", null_text=null_text)
    assert model.config.latent_scale == 0.5 and model.config.router_image_size == 32
    assert model.config.text_tokens == 5 and torch.equal(model.null_text, null_text)
    assert model.has_adapters and len(list(model.adapter_layers())) > 10
    with torch.no_grad():
        out = model(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    # the weights are the saved ones, not a fresh initialisation: every tensor of the VAE, the UNet
    # and the CLIP image tower equals the file's (adapted layers keep theirs under ``.base_layer``)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    saved = {"vae": AutoencoderKL.from_pretrained(folder / "vae").state_dict(),
             "unet": UNet2DConditionModel.from_pretrained(folder / "unet").state_dict(),
             "estimator.visual": {k[len("visual."):]: v for k, v in torch.load(clip_file).items()
                                  if k.startswith("visual.")}}
    for prefix, state in saved.items():
        loaded = {k.replace(".base_layer.", "."): v for k, v in model.get_submodule(prefix).state_dict().items()
                  if not any(part in k for part in ("lora_", "router", "adaptir"))}
        assert loaded.keys() == state.keys(), prefix
        assert all(torch.equal(loaded[k], state[k]) for k in state), prefix


def test_build_sd21_needs_local_weights(tmp_path):
    with pytest.raises(CheckpointError, match="--random-weights"):
        build_sd21()
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        build_sd21(tmp_path, tmp_path / "clip.pt")


@pytest.mark.slow
def test_sd21_random_weights_has_real_shapes():
    model = build_sd21(random_weights=True)
    from mordasr.model.inject import strip_adapters

    unet_params = sum(p.numel() for p in strip_adapters(model.unet).parameters())
    assert 860e6 < unet_params < 880e6  # SD 2.1 UNet: 865.9M parameters (adapters not counted)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 128, 128)


@pytest.mark.slow
def test_sd21_full_size_export_and_fp16(tmp_path):
    """SD 2.1 shapes export with external data past 2 GB, pass the TensorRT lint, match PyTorch in
    ONNX Runtime, and the FP16 bundle stays finite (no overflow) on a real degraded photograph.

    Real weights when MORDASR_SD21_DIR (a local diffusers folder) and MORDASR_CLIP_CKPT (a local
    open_clip checkpoint) are set; otherwise random weights, which check shapes and plumbing but
    say little about FP16 overflow. Run with: python -m pytest -m slow tests/test_sd21.py
    (about 15 minutes and 16 GB on 2 cores).
    """
    import os

    import numpy as np

    from mordasr.calib.precision_bundle import build_precision_bundle
    from mordasr.data.degradations import Degradation, degrade
    from mordasr.data.samples import load_sample_image
    from mordasr.export.buckets import grid_buckets
    from mordasr.export.bundle import export_bundle
    from mordasr.graphs.lint import lint_graph_file
    from mordasr.runtime import Restorer, load_manifest

    real = os.environ.get("MORDASR_SD21_DIR"), os.environ.get("MORDASR_CLIP_CKPT")
    model = (build_sd21(*real) if all(real) else build_sd21(random_weights=True)).eval()
    names = [p[0] for p in model.config.prompts]
    bundle = tmp_path / "sd21"
    manifest = export_bundle(model, bundle, "gated", grid_buckets(1, names), random_weights=not all(real))
    unet = manifest.graph("unet")
    assert unet.external_data and (bundle / unet.external_data).stat().st_size > 3e9
    assert manifest.random_weights == (not all(real)) and manifest.source["opset"] >= 17
    for g in manifest.graphs:
        assert lint_graph_file(bundle / g.file) == [], g.file
    hr = load_sample_image("astronaut")[::4, ::4]  # 128 x 128
    image = degrade(hr, Degradation(blur_sigma=1.2, noise_sigma=8 / 255, jpeg_quality=60), 4,
                    np.random.default_rng(0)).astype(np.float32)  # 32 x 32
    result = Restorer(bundle).restore(image)
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
        reference = model(x)[0].numpy().transpose(1, 2, 0)
    assert np.abs(result.image - reference).max() < 1e-3
    fp16 = tmp_path / "sd21-fp16"
    fp16.mkdir()
    build_precision_bundle(bundle, fp16, "fp16")
    assert load_manifest(fp16).graph("unet").external_data is None
    restored = Restorer(fp16).restore(image).image
    assert np.isfinite(restored).all()
