"""Injection, folding, the degradation estimator, the load-balance loss, config and checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mordasr.errors import CheckpointError
from mordasr.model import ModelConfig, OneStepSR, preset_config
from mordasr.model.adapters import AdapterLayer, MoRLayer, RoutingContext
from mordasr.model.estimator import DegradationEstimator, text_embeddings_from_clip
from mordasr.model.inject import adapter_layers, fold_adapters, inject_adapters
from mordasr.model.io import load_checkpoint, save_checkpoint
from mordasr.model.losses import load_balance_loss
from mordasr.tests.conftest import make_tiny_model


def test_injection_follows_osediff_placement(tiny_model):
    names = [n for n, _ in tiny_model.adapter_layers()]
    assert "vae.encoder.conv_in" in names and "vae.encoder.conv_out" in names
    assert "vae.quant_conv" in names
    assert any(n.startswith("vae.encoder.") and n.endswith("conv1") for n in names)
    assert any(n.startswith("unet.mid_block.attentions.0.") and n.endswith("to_q") for n in names)
    for suffix in ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                   "ff.net.2", "conv_shortcut", "conv_out"):
        assert any(n.startswith("unet.") and n.endswith(suffix) for n in names), suffix
    assert not any(n.startswith("vae.decoder") or n.startswith("vae.post_quant_conv") for n in names)
    assert not any("time_emb" in n or n == "unet.conv_in" for n in names)
    # Only adapter parameters train.
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or ".router." in n) for n in trainable)


def test_inject_without_match_raises():
    with pytest.raises(ValueError, match="no module matched"):
        inject_adapters(torch.nn.Sequential(torch.nn.ReLU()), ("to_q",), preset_config("tiny").adapter,
                        7, RoutingContext())


def test_fold_restores_base_architecture_and_names(tiny_model):
    folded = fold_adapters(tiny_model, torch.rand(7))
    assert not list(adapter_layers(folded))
    base = OneStepSR(tiny_model.config, with_adapters=False)
    assert set(folded.state_dict()) == set(base.state_dict())


@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=7, max_size=7))
def test_folded_equals_gated_for_any_scores(scores):
    model = _fold_model()
    s = torch.tensor([scores], dtype=torch.float32)
    folded = fold_adapters(model, s[0])
    g = torch.Generator().manual_seed(1)
    x_lr = torch.rand(1, 3, 12, 12, generator=g)
    z = torch.randn(1, model.config.latent_channels, 12, 12, generator=g)
    with torch.no_grad():
        with model.routing.scores_for(s):
            gated_enc, gated_unet = model.encode(x_lr), model.denoise(z)
        folded_enc, folded_unet = folded.encode(x_lr), folded.denoise(z)
    assert (gated_enc - folded_enc).abs().max().item() <= 1e-5
    assert (gated_unet - folded_unet).abs().max().item() <= 1e-5


_FOLD_MODEL = {}


def _fold_model():
    if "m" not in _FOLD_MODEL:
        _FOLD_MODEL["m"] = make_tiny_model(seed=3)
    return _FOLD_MODEL["m"]


def test_adapters_change_the_output(tiny_model):
    x = torch.rand(1, 3, 8, 8)
    base = OneStepSR(tiny_model.config, with_adapters=False)
    base.load_state_dict(fold_adapters(tiny_model, torch.zeros(7)).state_dict())
    scores = torch.rand(1, 7)
    with torch.no_grad():
        a, b = tiny_model(x, scores), base(x, scores)
    assert (a - b).abs().max() > 1e-3


def test_estimator_score_formula():
    visual = torch.nn.Identity()
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one dimension: pos = e1, neg = e2
    est = DegradationEstimator(visual, text, temperature=10.0, image_size=2)
    est.mean.zero_()
    est.std.fill_(1.0)
    # visual is the identity on a flattened "image": feed embeddings directly
    est.visual = torch.nn.Flatten()
    image = torch.tensor([[0.6, 0.8]]).reshape(1, 2)  # cos_pos = 0.6, cos_neg = 0.8
    est.mean = torch.zeros(1, 2)
    est.std = torch.ones(1, 2)
    s = est(image)
    expected = torch.exp(torch.tensor(8.0)) / (torch.exp(torch.tensor(6.0)) + torch.exp(torch.tensor(8.0)))
    assert torch.allclose(s[0, 0], expected)


def test_text_embeddings_computed_once_from_open_clip():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = CLIP(32, CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    prompts = preset_config("tiny").prompts
    text = text_embeddings_from_clip(clip, open_clip.get_tokenizer("ViT-B-16"), prompts)
    assert text.shape == (7, 2, 32)
    est = DegradationEstimator(clip.visual, text, 100.0, 32)
    assert "text_embeddings" in dict(est.named_buffers())  # stored, never recomputed
    s = est(torch.rand(3, 3, 32, 32))
    assert s.shape == (3, 7) and torch.all((s >= 0) & (s <= 1))


def test_load_balance_loss_charges_zero_slots_by_severity():
    layer = MoRLayer(torch.nn.Linear(4, 4), r_shared=1, r_routed=2, top_k=1, n_zero=2, num_scores=7,
                      alpha=None, routing=RoutingContext())
    layer.train()
    # Deterministic routing: every image to zero slot 0 (index 2).
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    layer.gate(torch.rand(4, 7))
    model = torch.nn.Sequential(layer)
    mild = load_balance_loss(model, torch.full((4,), 0.1))
    severe = load_balance_loss(model, torch.full((4,), 0.9))
    assert severe > mild > 0
    probs, kept = layer.last_routing
    p = probs.mean(0)
    assert torch.allclose(mild, 4 * (0.1 * 1.0 * p[2]))


def test_load_balance_loss_is_minimal_for_uniform_routing():
    layer = MoRLayer(torch.nn.Linear(4, 4), r_shared=1, r_routed=4, top_k=1, n_zero=0, num_scores=7,
                      alpha=None, routing=RoutingContext())
    layer.train()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.zero_()
        layer.router.weight[:, :4] = torch.eye(4) * 20  # score dim i -> expert i
    scores = torch.zeros(4, 7)
    scores[:, :4] = torch.eye(4)
    layer.gate(scores)
    uniform = load_balance_loss(torch.nn.Sequential(layer), torch.zeros(4))
    assert torch.allclose(uniform, torch.tensor(1.0), atol=1e-3)  # N * sum (1/N)(1/N) = 1


def test_config_roundtrip_and_unknown_key(tmp_path):
    cfg = preset_config("tiny", adapter="lora")
    cfg.save(tmp_path / "c.json")
    again = ModelConfig.load(tmp_path / "c.json")
    assert json.dumps(again.to_dict()) == json.dumps(cfg.to_dict())
    data = cfg.to_dict()
    data["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("sdxl")
    with pytest.raises(ValueError, match="adapter kind"):
        preset_config("tiny", adapter="dora")


def test_sd21_preset_has_sd21_shapes():
    cfg = preset_config("sd21")
    assert cfg.unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg.unet["cross_attention_dim"] == 1024
    assert cfg.latent_downsample == 8 and cfg.latent_scale == pytest.approx(0.18215)
    assert (cfg.adapter.r_shared, cfg.adapter.r_routed, cfg.adapter.top_k, cfg.adapter.n_zero) == (8, 32, 8, 4)


def test_checkpoint_roundtrip(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ckpt", {"kind": "test"})
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["has_adapters"] and meta["kind"] == "test"
    x, s = torch.rand(1, 3, 8, 8), torch.rand(1, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x, s), tiny_model(x, s))


def test_checkpoint_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(tmp_path / "ckpt")
    # Weights of another preset / shape.
    save_checkpoint(tiny_model, tmp_path / "ckpt2")
    data = json.loads((tmp_path / "ckpt2" / "config.json").read_text())
    data["model"]["unet"]["block_out_channels"] = [32, 48, 64, 64]
    (tmp_path / "ckpt2" / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "ckpt2")
    with pytest.raises(CheckpointError, match="holds mor adapters"):
        save_checkpoint(tiny_model, tmp_path / "ckpt3")
        load_checkpoint(tmp_path / "ckpt3", adapter="lora")


def test_every_adapter_layer_shares_one_routing_context(tiny_model):
    contexts = {id(layer.routing) for _, layer in tiny_model.adapter_layers()}
    assert contexts == {id(tiny_model.routing)}
    assert all(isinstance(layer, AdapterLayer) for _, layer in tiny_model.adapter_layers())


@settings(max_examples=25, deadline=None)
@given(scale=st.integers(1, 4), height=st.integers(1, 13), width=st.integers(1, 13))
def test_bicubic_upsample_equals_pytorch_bicubic(scale, height, width):
    """The TensorRT-parseable upsample (pad + conv + interleave) is PyTorch's bicubic."""
    import torch.nn.functional as F

    from mordasr.model.resample import bicubic_upsample

    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height * 31 + width))
    expected = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    assert torch.allclose(bicubic_upsample(x, scale), expected, atol=2e-6)
