"""AdaptIR: the matrix-product FFTs against torch.fft, the module (parameter count, identity at
init, fusing), training, and its exported bundle against PyTorch in ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mordasr.errors import MordasrError
from mordasr.model import OneStepSR, preset_config
from mordasr.model.adapters.adaptir import AdaptIR
from mordasr.model.spectral import angle, irfft2_matmul, irfft2_torch, rfft2_matmul, rfft2_torch
from mordasr.runtime.tiling import Tiling

TOL = 2e-5  # float32 matrix products vs cuFFT/pocketfft on unit-variance inputs of these sizes


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 24), w=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_matmul_dft_equals_torch_fft_for_odd_and_even_sizes(h, w, seed):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    re, im = rfft2_matmul(x)
    ref = torch.fft.rfft2(x, norm="ortho")
    assert re.shape == ref.shape
    assert torch.allclose(re, ref.real, atol=TOL) and torch.allclose(im, ref.imag, atol=TOL)
    back = irfft2_matmul(re, im, h, w)
    assert torch.allclose(back, torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho"), atol=TOL)
    assert torch.allclose(back, x, atol=TOL)  # and it is the inverse


def test_inverse_ignores_imaginary_parts_of_real_bins_as_torch_does():
    torch.manual_seed(0)
    for h, w in ((6, 8), (5, 7)):
        re, im = torch.randn(1, 1, h, w // 2 + 1), torch.randn(1, 1, h, w // 2 + 1)
        assert torch.allclose(irfft2_matmul(re, im, h, w), irfft2_torch(re, im, h, w), atol=TOL)


def test_self_conjugate_bins_are_exactly_real_in_both_paths():
    x = torch.randn(1, 2, 6, 8)
    for _, im in (rfft2_matmul(x), rfft2_torch(x)):
        for u, v in ((0, 0), (0, 4), (3, 0), (3, 4)):
            assert (im[..., u, v] == 0).all() and not torch.signbit(im[..., u, v]).any()


def test_angle_is_atan2_and_picks_plus_pi_on_the_cut():
    torch.manual_seed(1)
    re, im = torch.randn(1000), torch.randn(1000)
    assert torch.allclose(angle(re, im), torch.atan2(im, re), atol=1e-6)
    axes = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 2.0, -2.0, 0.0, -0.0])
    expected = torch.tensor([0.0, math.pi, math.pi / 2, -math.pi / 2, 0.0, math.pi])
    assert torch.allclose(angle(*axes), expected)


def test_parameter_count_matches_the_paper():
    # IPT: d = 576, 24 AdaptIR modules, 697K parameters in the paper
    assert sum(p.numel() for p in AdaptIR(576, ratio=24).parameters()) * 24 == 697_656


def _perturbed(module: AdaptIR, seed: int = 0) -> AdaptIR:
    """Trained-looking weights: every branch and gate active, phases scaled away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        module.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
        module.bn.running_var.uniform_(0.5, 2.0, generator=g)
    return module.eval()


@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (12, 9)])
def test_matmul_module_and_fused_module_equal_the_fft_module(hw):
    module = _perturbed(AdaptIR(32, ratio=4))
    x = torch.randn(2, 32, *hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = module(x)
        module.spectral = "matmul"
        matmul = module(x)
        module.spectral = "fft"
        fused = module.fuse("matmul")(x)
    assert reference.abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(matmul, reference, atol=1e-4)
    assert torch.allclose(fused, reference, atol=1e-4)
    with pytest.raises(RuntimeError, match="already fused"):
        module.fuse()


@pytest.fixture(scope="module")
def adaptir_model() -> OneStepSR:
    torch.manual_seed(0)
    model = OneStepSR(preset_config("tiny", adapter="adaptir")).eval()
    for name, module in model.named_modules():
        if isinstance(module, AdaptIR):
            _perturbed(module, seed=len(name))
    return model


def test_adaptir_sits_beside_every_transformer_feed_forward_and_starts_as_identity():
    torch.manual_seed(0)
    base = OneStepSR(preset_config("tiny", adapter="adaptir"), with_adapters=False).eval()
    model = OneStepSR(preset_config("tiny", adapter="adaptir"), with_adapters=False).eval()
    model.load_state_dict(base.state_dict())
    names = model.add_adapters()
    blocks = [n for n, _ in base.unet.named_modules() if n.endswith(".transformer_blocks.0")]
    assert sorted(names) == sorted(f"unet.{b}.ff" for b in blocks) and len(names) == 1  # the mid block
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adaptir." in n for n in trainable)
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        assert torch.equal(base(x), model(x))  # zero-initialised output conv and gates


def test_training_moves_only_adaptir_and_checkpoints_round_trip(tmp_path):
    from mordasr.model.io import base_path, load_checkpoint, save_checkpoint
    from mordasr.training.adapter_trainer import AdapterTrainingConfig, train_adapters

    model, _ = load_checkpoint(base_path("tiny"), adapter="adaptir")
    before = {n: p.clone() for n, p in model.named_parameters()}
    metrics = train_adapters(model, AdapterTrainingConfig(steps=3, seed=0), quiet=True)
    assert math.isfinite(metrics["loss_rec"]) and metrics["loss_bal"] == 0.0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".adaptir." in n for n in changed)
    loaded, _ = load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"), add_adapters=False)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert loaded.config.adapter.kind == "adaptir"


def test_train_cli_trains_adaptir(tmp_path):
    from mordasr.model.io import load_checkpoint
    from mordasr.training.cli import main as train_main

    out = tmp_path / "run"
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(out), "--steps", "2", "--batch", "2",
                                             "--crop", "32", "--adapter", "adaptir", "-q"])
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out, add_adapters=False)
    assert model.config.adapter.kind == "adaptir" and meta["has_adapters"]


@pytest.fixture(scope="module")
def adaptir_bundle(adaptir_model, tmp_path_factory):
    from mordasr.export.buckets import make_buckets
    from mordasr.export.bundle import export_bundle

    names = [p[0] for p in adaptir_model.config.prompts]
    buckets = make_buckets(np.full((1, len(names)), 0.5, np.float32), names)
    path = tmp_path_factory.mktemp("adaptir") / "bundle"
    export_bundle(adaptir_model, path, "adaptir", buckets)
    return path


def test_exported_graph_has_no_dft_and_passes_the_tensorrt_lint(adaptir_bundle):
    from mordasr.graphs.lint import lint_graph_file
    from mordasr.runtime import load_manifest

    manifest = load_manifest(adaptir_bundle)
    assert manifest.mode == "adaptir" and manifest.adapter == "adaptir"
    for g in manifest.graphs:
        assert lint_graph_file(adaptir_bundle / g.file) == [], g.file
    ops = {n.op_type for n in onnx.load(str(adaptir_bundle / "unet.onnx")).graph.node}
    assert not ops & {"DFT", "STFT", "Atan2"} and {"MatMul", "Cos", "Sin", "Atan"} <= ops
    assert "BatchNormalization" not in ops  # folded into the head conv


@pytest.mark.parametrize("hw", [(16, 16), (20, 28), (13, 9)])
def test_exported_bundle_matches_pytorch_in_onnxruntime(adaptir_bundle, adaptir_model, hw):
    from mordasr.runtime import Restorer

    restorer = Restorer(adaptir_bundle)
    image = np.random.default_rng(sum(hw)).uniform(0, 1, hw + (3,)).astype(np.float32)
    out = restorer.restore(image, tiling=Tiling(tile=0)).image
    # the runtime reflect-pads to the graphs' multiple; AdaptIR's FFT sees the whole padded map
    m = restorer.manifest.lr_multiple
    padded = np.pad(image, ((0, -hw[0] % m), (0, -hw[1] % m), (0, 0)), mode="reflect")
    with torch.no_grad():
        ref = adaptir_model(torch.from_numpy(padded.transpose(2, 0, 1)[None].copy()))[0].numpy()
    s = restorer.scale
    assert np.abs(out - ref.transpose(1, 2, 0)[: hw[0] * s, : hw[1] * s]).max() < 1e-4


def test_export_cli_picks_adaptir_mode_and_refuses_routing_modes(adaptir_model, tmp_path):
    from mordasr.export.bundle import check_mode
    from mordasr.export.cli import main as export_main
    from mordasr.model.io import save_checkpoint

    ckpt = save_checkpoint(adaptir_model, tmp_path / "ckpt")
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "c"), "--mode", "folded"])
    assert refused.exit_code == 2 and "use --mode adaptir" in refused.stderr
    with pytest.raises(MordasrError, match="trained with --adapter adaptir"):
        check_mode("mor", "adaptir")


def test_adaptir_trains_under_bfloat16_autocast():
    """torch.fft and atan2 have no bfloat16 CPU kernels (and in bfloat16 training went non-finite):
    the adapter runs in float32 inside autocast, so `--precision bf16` trains it like the others."""
    from mordasr.model.adapters.adaptir import AdaptIR

    torch.manual_seed(0)
    module = AdaptIR(32)
    torch.nn.init.normal_(module.tail.weight, std=0.1)  # a non-zero output (the adapter starts at zero)
    x = torch.randn(2, 32, 10, 12)
    reference = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    out.float().square().mean().backward()
    assert module.head.weight.grad is not None and torch.isfinite(module.head.weight.grad).all()
    assert torch.allclose(out.float(), reference, atol=0.05 * reference.abs().max().item())


def test_adaptir_gradient_stays_finite_on_a_flat_channel():
    """A channel that is flat after the head's BatchNorm has re = im = 0 in every frequency bin,
    where sqrt's derivative is infinite: the gradient must stay finite (a study run went
    non-finite without the epsilon under the magnitude)."""
    from mordasr.model.adapters.adaptir import AdaptIR

    torch.manual_seed(0)
    module = AdaptIR(16, hidden=8)
    torch.nn.init.normal_(module.tail.weight, std=0.1)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        module.head.weight[0].zero_()  # channel 0: constant, so zero after BatchNorm
    module(x).square().mean().backward()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
