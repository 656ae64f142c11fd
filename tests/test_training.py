"""Data, synthetic degradations, the trainers and the mordasr-train command."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mordasr.data.degradations import Degradation, degrade, degraded_batch, mixed_degraded_batch, target_scores
from mordasr.data.samples import HELDOUT_IMAGES, TRAIN_IMAGES, CropSampler, load_sample_image, sample_images
from mordasr.model.io import base_path, load_checkpoint
from mordasr.tests.conftest import make_tiny_model
from mordasr.training.adapter_trainer import AdapterTrainingConfig, train_adapters
from mordasr.training.base_config import BaseTrainingConfig
from mordasr.training.base_trainer import train_base
from mordasr.training.cli import main as train_main
from mordasr.training.common import model_device, resolve_device


def test_sample_images_ship_with_the_package_and_splits_are_disjoint():
    assert not set(TRAIN_IMAGES) & set(HELDOUT_IMAGES)
    for image in sample_images("heldout"):
        assert image.dtype == np.float32 and image.ndim == 3 and image.shape[-1] == 3
        assert 0 <= image.min() and image.max() <= 1
    with pytest.raises(ValueError):
        load_sample_image("not-an-image")


def test_crop_sampler_is_reproducible():
    images = sample_images("heldout")
    a = CropSampler(images, 32, seed=4).sample(3)
    b = CropSampler(images, 32, seed=4).sample(3)
    assert a.shape == (3, 32, 32, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="at least"):
        CropSampler(images, 100_000)


def test_degrade_shapes_and_known_effects():
    rng = np.random.default_rng(0)
    hr = CropSampler(sample_images("heldout"), 64, 0).sample(1)[0]
    clean = degrade(hr, Degradation(), 4, rng)
    noisy = degrade(hr, Degradation(noise_sigma=20 / 255), 4, rng)
    blurred = degrade(hr, Degradation(blur_sigma=3.0), 4, rng)
    assert clean.shape == (16, 16, 3)
    assert np.abs(noisy - clean).mean() > 0.03
    high_freq = lambda im: np.abs(np.diff(im, axis=0)).mean()  # noqa: E731
    assert high_freq(blurred) < high_freq(clean)


def test_target_scores_follow_severity():
    mild = target_scores(Degradation())
    worst = target_scores(Degradation(3.0, 25 / 255, 30))
    assert mild.shape == (7,) and np.all((0 <= mild) & (mild <= 1))
    assert np.all(worst >= mild) and worst[0] > 0.9
    assert target_scores(Degradation(noise_sigma=10 / 255))[2] > target_scores(Degradation(noise_sigma=2 / 255))[2]
    lr, degs, targets = degraded_batch(np.zeros((3, 32, 32, 3), np.float32), 4, np.random.default_rng(0))
    assert lr.shape == (3, 8, 8, 3) and targets.shape == (3, 7) and len(degs) == 3


def test_mixed_batch_kinds_draw_the_stated_degradations(monkeypatch):
    """Clean: none; synthetic: each factor present or not; compound: blur, noise and JPEG in every draw."""
    import mordasr.data.degradations as synthetic

    drawn = []
    real_degrade = synthetic.degrade
    monkeypatch.setattr(synthetic, "degrade", lambda hr, deg, *a: drawn.append(deg) or real_degrade(hr, deg, *a))
    hr = np.random.default_rng(0).random((16, 32, 32, 3), dtype=np.float32)

    def factors(kind):
        drawn.clear()
        lr = mixed_degraded_batch(hr, 4, np.random.default_rng(3), ((kind, 1.0),))
        assert lr.shape == (16, 8, 8, 3) and len(drawn) == 16
        return np.array([(d.blur_sigma > 0, d.noise_sigma > 0, d.jpeg_quality is not None) for d in drawn])

    assert not factors("clean").any()
    synthetic_factors = factors("synthetic")
    assert synthetic_factors.any(axis=0).all() and not synthetic_factors.all(axis=1).all()
    assert factors("compound").all()


def test_sr_mix_parses_every_kind_and_rejects_unknown_ones():
    mix = BaseTrainingConfig(sr_mix="clean=1,synthetic=1,compound=1,realesrgan=1").degradation_mix()
    assert mix == tuple((k, 0.25) for k in ("clean", "synthetic", "compound", "realesrgan"))
    with pytest.raises(ValueError, match="compound"):
        BaseTrainingConfig(sr_mix="clean=1,heavy=1").degradation_mix()


def test_train_adapters_updates_only_adapters(tmp_path):
    model = make_tiny_model(seed=5)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and ".router." not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_B" in k}
    cfg = AdapterTrainingConfig(steps=3, batch=2, crop=32, eval_every=2, eval_crops=2)
    metrics = train_adapters(model, cfg, tmp_path / "ckpt", quiet=True)
    assert np.isfinite(metrics["psnr"]) and np.isfinite(metrics["loss_rec"])
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(not torch.equal(state[k], v) for k, v in adapters.items())
    rows = list(csv.DictReader(open(tmp_path / "ckpt" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["kind"] == "adapted" and loaded.has_adapters


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        AdapterTrainingConfig(steps=0).validate()


def test_shipped_tiny_base_loads():
    config = json.loads((base_path("tiny") / "config.json").read_text())
    assert config["meta"]["kind"] == "base" and not config["meta"]["random_weights"]
    model, meta = load_checkpoint(base_path("tiny"))
    assert model.has_adapters and not meta["has_adapters"]
    assert set(meta["stages_done"]) == {"vae", "sr", "estimator"}


def test_train_cli_adapters_and_errors(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(out), "--steps", "2", "--batch", "2",
                                             "--crop", "32", "--adapter", "lora", "-q"])
    assert result.exit_code == 0, result.output
    assert "held-out PSNR" in result.output and (out / "model.safetensors").is_file()
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "x"), "--base", str(out),
                                             "--adapter", "lora"])
    assert result.exit_code == 2 and "already holds adapters" in result.stderr
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "x"), "--base", str(out)])
    assert result.exit_code == 2 and "holds lora adapters, not mor" in result.stderr
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "y"), "--base", str(tmp_path)])
    assert result.exit_code == 2 and "neither a shipped base (tiny, esrgan-student) nor a checkpoint" in result.stderr


def test_train_cli_adapter_shape_options(tmp_path):
    """--r-shared/--r-routed/--top-k/--zero-slots reach the adapters and their saved config; bad
    shapes and MoR-only options on LoRA are one-line errors."""
    from mordasr.model.adapters.mor import MoRLayer

    out = tmp_path / "mor"
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(out), "--steps", "1", "--batch", "1",
                                             "--crop", "32", "--r-shared", "0", "--r-routed", "6", "--top-k", "3",
                                             "--zero-slots", "1", "-q"])
    assert result.exit_code == 0, result.output
    model, _ = load_checkpoint(out, add_adapters=False)
    layer = next(m for m in model.modules() if isinstance(m, MoRLayer))
    assert (layer.r_shared, layer.r_routed, layer.top_k, layer.n_zero) == (0, 6, 3, 1)
    assert layer.router.out_features == 7
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "x"), "--top-k", "9", "--zero-slots",
                                             "0", "--r-routed", "8"])
    assert result.exit_code == 2 and "top_k=9 must lie in 1..8" in result.stderr
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "x"), "--adapter", "lora",
                                             "--top-k", "2"])
    assert result.exit_code == 2 and "--top-k and --zero-slots apply to --adapter mor" in result.stderr
    assert not (tmp_path / "x").exists()


def test_train_cli_non_finite_loss_is_a_one_line_error(tmp_path, monkeypatch):
    import mordasr.training.adapter_trainer as trainer

    def diverge(*_args, **_kwargs):
        raise FloatingPointError("non-finite loss at step 155")

    monkeypatch.setattr(trainer, "train_adapters", diverge)
    result = CliRunner().invoke(train_main, ["adapters", "-o", str(tmp_path / "run"), "--adapter", "lora"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "mordasr-train: error: non-finite loss at step 155; nothing was written (try a lower --lr)"]
    assert not (tmp_path / "run").exists()


def test_train_cli_base_stage_checkpoints_and_resume(tmp_path):
    out = tmp_path / "base"
    args = ["base", "-o", str(out), "--vae-steps", "2", "--estimator-steps", "1", "--sr-steps", "2",
            "--batch", "1", "--crop", "32", "--checkpoint-every", "1", "-q"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(out, add_adapters=False)
    assert meta["stages_done"] == ["vae", "sr", "estimator"]
    work = tmp_path / ".base.work"
    assert (work / "curves-vae.csv").is_file() and (work / "curves-sr.csv").is_file()
    # the estimator's curve tracks its correlation with the true strengths on held-out crops
    header = (work / "curves-estimator.csv").read_text().splitlines()[0]
    assert header == "step,loss,r_blur,r_noise,r_compression"
    assert not list((work / ".resume").rglob("*.pt"))  # finished stages leave no resume state
    again = CliRunner().invoke(train_main, args)  # a finished run run again trains nothing more
    assert again.exit_code == 0 and len((work / "curves-sr.csv").read_text().splitlines()) == 3
    assert {h["device"] for h in meta["history"]} == {"cpu"}  # auto: no GPU seen here


@pytest.mark.parametrize("weights", [(0.0, 0.25), (0.5, 0.0)])  # each term alone: both code paths
def test_train_cli_base_loss_weights_reach_the_sr_stage_and_are_recorded(tmp_path, weights):
    out = tmp_path / "base"
    args = ["base", "-o", str(out), "--stages", "sr", "--sr-steps", "1", "--batch", "2", "--crop", "32",
            "--recon-weight", str(weights[0]), "--latent-weight", str(weights[1]), "-q"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    model, meta = load_checkpoint(out, add_adapters=False)
    assert (meta["history"][-1]["recon_weight"], meta["history"][-1]["latent_weight"]) == weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    bad = CliRunner().invoke(train_main, ["base", "-o", str(tmp_path / "b"), "--latent-weight", "-0.1", "-q"])
    assert bad.exit_code == 2 and "--latent-weight" in bad.stderr and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="recon_weight and latent_weight"):
        BaseTrainingConfig(recon_weight=-1).validate()


def test_train_cli_base_unet_shape_from_scratch_and_from_a_start(tmp_path):
    fresh = tmp_path / "fresh"
    args = ["base", "-o", str(fresh), "--vae-steps", "1", "--sr-steps", "1", "--estimator-steps", "1",
            "--batch", "1", "--crop", "32", "--unet-channels", "32,32,48,48", "--unet-layers", "2", "-q"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    model, _ = load_checkpoint(fresh, add_adapters=False)
    assert tuple(model.config.unet["block_out_channels"]) == (32, 32, 48, 48)
    assert model.config.unet["layers_per_block"] == 2 and len(model.unet.down_blocks[0].resnets) == 2
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)

    shipped, _ = load_checkpoint(base_path("tiny"), add_adapters=False)
    wide = tmp_path / "wide"
    args = ["base", "-o", str(wide), "--from", str(base_path("tiny")), "--stages", "sr", "--sr-steps", "1",
            "--batch", "1", "--crop", "32", "--unet-channels", "64,96,128,128", "-q"]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"wrote .*wide \(\d+\.\d MB of weights\)", result.output)
    model, meta = load_checkpoint(wide, add_adapters=False)
    assert model.unet.conv_in.weight.shape[0] == 64 and shipped.unet.conv_in.weight.shape[0] == 48
    assert all(torch.equal(v, shipped.estimator.state_dict()[k]) for k, v in model.estimator.state_dict().items())
    assert meta["stages_done"] == ["vae", "sr", "estimator"] and "sr_l1" in meta["final_losses"]


@pytest.mark.parametrize("channels, message", [
    ("48,64,96", "4 values, one per UNet level"),
    ("40,64,96,96", "multiple of 16"),
    ("48,x,96,96", "'x' is not a whole number"),
])
def test_train_cli_base_refuses_a_bad_unet_shape_before_writing(tmp_path, channels, message):
    result = CliRunner().invoke(train_main, ["base", "-o", str(tmp_path / "b"), "--unet-channels", channels, "-q"])
    assert result.exit_code == 2 and message in result.stderr
    assert not list(tmp_path.iterdir())


def test_train_base_new_unet_needs_the_sr_stage_and_a_resume_state_of_another_shape_is_refused(
        tmp_path, monkeypatch):
    from mordasr.errors import MordasrError
    from mordasr.training import base_trainer

    result = CliRunner().invoke(train_main, ["base", "-o", str(tmp_path / "b"), "--from", str(base_path("tiny")),
                                             "--stages", "estimator", "--unet-channels", "64,64,96,96", "-q"])
    assert result.exit_code == 2 and "--stages sr" in result.stderr and not list(tmp_path.iterdir())

    out = tmp_path / "base"
    cfg = BaseTrainingConfig(sr_steps=2, batch=1, crop=32, checkpoint_every=1)
    monkeypatch.setattr(base_trainer._Resumable, "clear", lambda self: None)  # keep the run's resume state
    train_base(out, cfg, quiet=True, stages=("sr",), unet_channels=(32, 32, 48, 48))
    cfg.sr_steps = 3
    with pytest.raises(MordasrError, match="written for a model of another shape"):
        train_base(out, cfg, quiet=True, stages=("sr",), unet_channels=(64, 64, 96, 96))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where PyTorch sees no GPU")
def test_train_cli_base_cuda_without_gpu_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(train_main, ["base", "-o", str(tmp_path / "b"), "--device", "cuda", "-q"])
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "b").exists()
    assert resolve_device("auto").type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to PyTorch")
def test_train_base_on_cuda_resumes_a_cpu_state_and_writes_a_cpu_checkpoint(tmp_path, monkeypatch):
    from mordasr.training import base_trainer

    out = tmp_path / "base"
    cfg = BaseTrainingConfig(vae_steps=2, sr_steps=2, estimator_steps=1, batch=2, crop=32, checkpoint_every=1)
    monkeypatch.setattr(base_trainer._Resumable, "clear", lambda self: None)  # keep the CPU run's states
    train_base(out, cfg, quiet=True, stages=("vae",), device="cpu")
    monkeypatch.undo()
    cfg.vae_steps = 3  # one more step, on the GPU, from the CPU's resume state at step 2
    train_base(out, cfg, quiet=True, stages=("vae",), start_from=out, device="cuda")
    steps = [row.split(",")[0] for row in (tmp_path / ".base.work" / "curves-vae.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3"]
    model, meta = load_checkpoint(out, add_adapters=False)
    assert meta["history"][-1]["device"] == "cuda" and model_device(model).type == "cpu"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_cli_average_writes_the_weighted_mean_of_base_checkpoints(tmp_path):
    from mordasr.model.io import save_checkpoint

    base, meta = load_checkpoint(base_path("tiny"), add_adapters=False)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01)
    save_checkpoint(base, tmp_path / "moved", meta)
    result = CliRunner().invoke(train_main, ["average", "-o", str(tmp_path / "soup"), str(base_path("tiny")),
                                             str(tmp_path / "moved"), "--weights", "3,1"])
    assert result.exit_code == 0, result.output
    soup, soup_meta = load_checkpoint(tmp_path / "soup", add_adapters=False)
    moved = base.state_dict()
    for name, value in soup.state_dict().items():
        expected = (3 * state[name] + moved[name]) / 4 if value.is_floating_point() else state[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    assert soup_meta["kind"] == "base" and soup_meta["history"][-1]["stage"] == "average"
    assert [s["weight"] for s in soup_meta["history"][-1]["sources"]] == [3.0, 1.0]
    assert set(soup_meta["stages_done"]) == {"vae", "sr", "estimator"}


@pytest.mark.parametrize("args, message", [
    (["{base}"], "at least two"),
    (["{base}", "{base}", "--weights", "1"], "one positive weight"),
    (["{base}", "{base}", "--weights", "1,-1"], "one positive weight"),
    (["{base}", "{base}", "--weights", "1,x"], "not a number"),
    (["{base}", "{adapted}"], "not a base checkpoint"),
])
def test_train_cli_average_errors(tmp_path, args, message):
    model = make_tiny_model(seed=1)
    from mordasr.model.io import save_checkpoint

    save_checkpoint(model, tmp_path / "adapted", {"kind": "adapted"})
    argv = [a.format(base=base_path("tiny"), adapted=tmp_path / "adapted") for a in args]
    result = CliRunner().invoke(train_main, ["average", "-o", str(tmp_path / "soup"), *argv])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "soup").exists()
