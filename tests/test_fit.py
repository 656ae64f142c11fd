"""Paper-fidelity training: Real-ESRGAN degradations, folder datasets, perceptual losses, config
files, the full trainer (every loss on), bit-for-bit resume, ablations and data-parallel sync."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mordasr.data.realesrgan import (
    RealESRGANConfig,
    anisotropic_kernel,
    degrade_realesrgan,
    random_kernel,
    sinc_kernel,
)
from mordasr.errors import CheckpointError, MordasrError
from mordasr.training.paper_config import load_fit_config

FAST = ["run.steps=4", "run.eval_every=2", "run.checkpoint_every=2", "run.log_every=1", "data.batch=2",
        "data.crop=32", "data.val_images=2", "optim.lr=1e-3"]


# -- degradations -----------------------------------------------------------------------------------

def test_kernels_are_normalised_and_shaped_as_real_esrgan_draws_them():
    rng = np.random.default_rng(0)
    cfg = RealESRGANConfig()
    for _ in range(50):
        k = random_kernel(cfg.first, rng)
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-6
    iso = anisotropic_kernel(21, 2.0, 2.0, 0.0)
    assert np.allclose(iso, iso.T) and iso.argmax() == 21 * 10 + 10
    aniso = anisotropic_kernel(21, 3.0, 0.5, 0.0)
    assert aniso[10, 15] > aniso[15, 10]  # wide along x, narrow along y
    ringing = sinc_kernel(21, np.pi / 4)
    assert ringing.min() < 0 and abs(ringing.sum() - 1) < 1e-6  # a sinc rings


def test_second_order_degradation_shapes_range_and_determinism():
    hr = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    cfg = RealESRGANConfig()
    a = degrade_realesrgan(hr, 4, cfg, np.random.default_rng(7), torch.Generator().manual_seed(7))
    b = degrade_realesrgan(hr, 4, cfg, np.random.default_rng(7), torch.Generator().manual_seed(7))
    c = degrade_realesrgan(hr, 4, cfg, np.random.default_rng(8), torch.Generator().manual_seed(8))
    assert a.shape == (3, 3, 16, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and torch.equal(a, (a * 255).round() / 255)  # 8-bit levels


def test_bad_degradation_config_is_one_line():
    with pytest.raises(MordasrError, match="first.noise_range: low must not exceed high"):
        load_fit_config(None, ["data.degradation.first.noise_range=[30, 1]"])
    with pytest.raises(MordasrError, match="sum to 1"):
        load_fit_config(None, ["data.degradation.second.resize_prob=[0.5, 0.5, 0.5]"])


# -- datasets ---------------------------------------------------------------------------------------

def _png(path: Path, size=(40, 40), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_hr_folder_is_recursive_and_skips_bad_files(tmp_path, caplog):
    from mordasr.data.folders import HRFolder

    _png(tmp_path / "a.png")
    _png(tmp_path / "nested" / "deeper" / "b.png", seed=1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    _png(tmp_path / "tiny.png", size=(8, 8))
    data = HRFolder(tmp_path, crop=32)
    assert len(data.images) == 2 and len(data.skipped) == 2
    assert data.sample(5).shape == (5, 32, 32, 3)
    assert "2 of 4 images skipped" in caplog.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(MordasrError, match="holds no images"):
        HRFolder(tmp_path / "empty", crop=32)
    with pytest.raises(MordasrError, match="does not exist"):
        HRFolder(tmp_path / "missing", crop=32)


def test_paired_folders_in_realsr_and_drealsr_layouts(tmp_path):
    from mordasr.data.folders import PairedFolder

    _png(tmp_path / "realsr" / "Canon_001_HR.png", (64, 48))
    _png(tmp_path / "realsr" / "Canon_001_LR4.png", (16, 12))
    _png(tmp_path / "drealsr" / "test_HR" / "DSC_1454_x1.png", (66, 50))
    _png(tmp_path / "drealsr" / "test_LR" / "DSC_1454_x4.png", (16, 12))
    for layout, key in (("realsr", "canon_001"), ("drealsr", "dsc_1454")):
        pairs = PairedFolder(tmp_path / layout, scale=4).pairs
        assert [p[0] for p in pairs] == [key]
        assert pairs[0][1].shape == (12, 16, 3) and pairs[0][2].shape == (48, 64, 3)
    _png(tmp_path / "lonely" / "HR" / "x.png")
    with pytest.raises(MordasrError, match="no LR/HR pairs"):
        PairedFolder(tmp_path / "lonely", scale=4)


# -- perceptual ---------------------------------------------------------------------------------------

def test_lpips_loads_from_a_local_file_and_the_fallback_is_named(tmp_path):
    from mordasr.training.perceptual import LPIPS, StructuralLoss, perceptual_loss

    weights = tmp_path / "lpips_vgg.pth"
    state = LPIPS().state_dict()
    for key in [k for k in state if k.startswith("lin")]:
        state[key] = state[key].abs()  # LPIPS's learned heads are non-negative
    torch.save(state, weights)
    module, name = perceptual_loss(weights)
    assert isinstance(module, LPIPS) and "lpips-vgg" in name
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(module(x, x), torch.zeros(2), atol=1e-6) and (module(x, x.flip(-1)) > 0).all()
    fallback, name = perceptual_loss(None)
    assert isinstance(fallback, StructuralLoss) and "no LPIPS weights" in name
    assert fallback(x, x).abs().max() < 1e-5 and (fallback(x, torch.rand_like(x)) > 0.1).all()
    torch.save({"lin0.model.1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="not LPIPS-VGG weights"):
        LPIPS.from_file(tmp_path / "wrong.pth")


# -- configuration ------------------------------------------------------------------------------------

def test_shipped_configs_parse():
    from importlib import resources

    configs = resources.files("mordasr.training").joinpath("configs")
    shipped = [f for f in configs.iterdir() if f.name.endswith(".yaml")]
    assert {f.name for f in shipped} >= {"tiny.yaml", "sd21.yaml"}
    for file in shipped:
        cfg = load_fit_config(Path(str(file)))
        assert cfg.run.preset == file.name.split(".")[0]


def test_yaml_toml_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("run:\n  steps: 7\nloss:\n  gan: 0.5\noptim:\n  betas: [0.8, 0.9]\n")
    (tmp_path / "b.toml").write_text("[run]\nsteps = 9\n[gan]\nloss = 'non-saturating'\n")
    a = load_fit_config(tmp_path / "a.yaml", ["loss.vsd=0", "run.ablation=mor-no-zero"])
    assert a.run.steps == 7 and a.loss.gan == 0.5 and a.loss.vsd == 0 and a.optim.betas == (0.8, 0.9)
    assert a.run.ablation == "mor-no-zero" and a.optim.lr == 5e-5  # the paper's default
    b = load_fit_config(tmp_path / "b.toml")
    assert b.run.steps == 9 and b.gan.loss == "non-saturating"
    (tmp_path / "bad.yaml").write_text("loss:\n  vsdd: 1\n")
    cases = [((tmp_path / "bad.yaml", ()), "config: unknown key 'loss.vsdd'"),
             ((None, ["optim.lrr=1"]), "config: unknown key 'optim.lrr'"),
             ((None, ["run.ablation=sparse"]), "run.ablation must be one of"),
             ((None, ["nonsense"]), "expected KEY=VALUE"),
             ((tmp_path / "missing.yaml", ()), "does not exist")]
    for (path, overrides), message in cases:
        with pytest.raises(MordasrError, match=message):
            load_fit_config(path, overrides)


# -- the trainer ---------------------------------------------------------------------------------------

def _fit(out: Path, extra=(), resume=False, stop_after=None):
    from mordasr.training.paper_trainer import FitTrainer

    cfg = load_fit_config(None, list(FAST) + list(extra))
    trainer = FitTrainer(cfg, out, resume=resume, quiet=True)
    return trainer, trainer.fit(stop_after)


def test_every_loss_term_is_active_and_finite(tmp_path):
    trainer, result = _fit(tmp_path / "run")
    final = result["final"]
    for key in ("l2", "perceptual", "vsd", "gan", "balance", "vsd_diffusion", "disc", "grad_norm",
                "val_psnr", "val_ssim", "active_ranks"):
        assert key in final and math.isfinite(final[key]), key
    assert final["vsd"] > 0 and final["gan"] != 0 and final["balance"] > 0
    run = tmp_path / "run"
    assert (run / "config.resolved.yaml").is_file() and (run / "metrics.csv").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    from mordasr.model.io import load_checkpoint

    model, meta = load_checkpoint(run / "model", add_adapters=False)  # mordasr-export reads this
    assert model.has_adapters and meta["training"]["run"]["steps"] == 4
    usage = json.loads((run / "router_stats.json").read_text())["expert_usage"]
    assert len(usage) == trainer.model.config.adapter.r_routed + trainer.model.config.adapter.n_zero


def test_resume_continues_bit_for_bit(tmp_path):
    """4 steps straight equal 2 steps, a kill, and 2 resumed steps exactly (torch.equal), with EMA
    on so its restore is exercised too."""
    ema = ["optim.ema=0.9"]
    straight, _ = _fit(tmp_path / "straight", ema)
    half, result = _fit(tmp_path / "halves", ema, stop_after=2)  # the job is killed after 2 of 4 steps
    assert not result["finished"] and not (tmp_path / "halves" / "model").exists()
    del half
    resumed, result = _fit(tmp_path / "halves", ema, resume=True)
    assert result["finished"]
    assert resumed.step == 4
    a, b = straight._trainable_state(), resumed._trainable_state()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    ema_a, ema_b = straight.ema.state_dict(), resumed.ema.state_dict()
    assert ema_a.keys() == ema_b.keys()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[k], a[k]) for k in ema_a if k in a)  # EMA is not the weights
    for name in ("vsd", "disc"):
        sa, sb = straight.state()[name], resumed.state()[name]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_folder_errors(tmp_path):
    from mordasr.training.cli import main as train_main

    out = tmp_path / "run"
    _fit(out, stop_after=1)
    again = CliRunner().invoke(train_main, ["fit", "-o", str(out), "--set", "run.steps=2"])
    assert again.exit_code == 2 and "already holds checkpoints: pass --resume" in again.stderr
    other = CliRunner().invoke(train_main, ["fit", "-o", str(out), "--resume", "--set", "run.adapter=lora",
                                            "--set", "run.steps=3"])
    assert other.exit_code == 2 and "is a tiny/mor checkpoint, this run is tiny/lora" in other.stderr
    fresh = CliRunner().invoke(train_main, ["fit", "-o", str(tmp_path / "new"), "--resume"])
    assert fresh.exit_code == 2 and "has no checkpoint to resume from" in fresh.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nodata = CliRunner().invoke(train_main, ["fit", "-o", str(tmp_path / "x"), "--set", f"data.train_dir={empty}"])
    assert nodata.exit_code == 2 and "holds no images" in nodata.stderr
    assert len([line for line in nodata.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("ablation,kind,expert_size,n_zero,aware", [
    ("dense-lora", "lora", 1, 2, True), ("lora-moe", "mor", 2, 0, True),
    ("mor-no-zero", "mor", 1, 0, True), ("mor-std-balance", "mor", 1, 2, False), ("mor", "mor", 1, 2, True)])
def test_ablations_build_the_paper_rows(ablation, kind, expert_size, n_zero, aware):
    from mordasr.model.adapters.mor import MoRLayer
    from mordasr.training.ablations import build_model

    cfg = load_fit_config(None, [f"run.ablation={ablation}"])
    model, degradation_aware, _ = build_model(cfg)
    adapter = model.config.adapter
    assert (adapter.kind, adapter.expert_size, degradation_aware) == (kind, expert_size, aware)
    layers = [m for m in model.modules() if isinstance(m, MoRLayer)]
    if kind == "mor":
        assert layers and all(x.n_zero == n_zero and x.expert_size == expert_size for x in layers)
        gate = layers[0].gate(torch.rand(3, model.config.num_degradations))
        assert gate.shape == (3, adapter.rank)
        if expert_size > 1:  # whole experts switch on and off together
            routed = gate[:, adapter.r_shared:].reshape(3, -1, expert_size)
            assert torch.equal(routed.min(-1).values, routed.max(-1).values)
    else:
        assert not layers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes training; the single-process fit tests cover the trainer itself
def test_two_gloo_processes_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "mordasr.training.cli", "fit", "-o", str(out), "-q"]
    for item in FAST[1:] + ["run.steps=2", "run.eval_every=2", "data.val_images=1"]:
        args += ["--set", item]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "distributed.json").read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    assert report["in_sync"] and len(set(report["digests"])) == 1


def test_only_the_last_keep_last_checkpoints_are_kept(tmp_path):
    """run.keep_last: writing a fourth checkpoint with keep_last 2 leaves the newest two."""
    from mordasr.training.checkpoint import checkpoints, latest_state, save_state

    for step in (10, 20, 30, 40):
        save_state(tmp_path, step, {"step": step, "weights": torch.full((2,), float(step))}, keep_last=2)
    assert [step for step, _ in checkpoints(tmp_path)] == [30, 40]
    step, state, _ = latest_state(tmp_path)
    assert step == 40 and torch.equal(state["weights"], torch.full((2,), 40.0))
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no half-written folder left
