"""mordasr-eval: the metrics follow the published convention, the recipes are deterministic, and
the command scores bundles, checkpoints and bicubic side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mordasr import metrics
from mordasr.benchmarks.eval_cli import main as eval_main
from mordasr.benchmarks.recipes import RECIPES, mod_crop


def _gray(level: int, shape=(40, 48)) -> np.ndarray:
    return np.full((*shape, 3), level, dtype=np.uint8)


@pytest.mark.parametrize("delta", [1, 3, 10])
def test_y_psnr_matches_the_closed_form(delta):
    """Gray images k and k + delta (8-bit) differ in BT.601 studio-range Y by 219 * delta / 255
    everywhere, so PSNR_Y = 20 log10(255 / (219 delta / 255)); the border is cropped first."""
    ref, out = _gray(100), _gray(100 + delta)
    out[:4] = 0  # garbage in the 4-pixel border must not count
    out[:, -4:] = 255
    expected = 20 * np.log10(255 / (219 * delta / 255))
    assert metrics.psnr_y(out, ref, border=4) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr_y(out, ref, border=0) < expected - 1  # the border would count otherwise


def test_y_channel_is_bt601_studio_range():
    assert metrics.y_channel(_gray(0))[0, 0] == pytest.approx(16.0)
    assert metrics.y_channel(_gray(255))[0, 0] == pytest.approx(235.0)
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert metrics.y_channel(red)[0, 0] == pytest.approx(16 + 65.481)


def test_ssim_and_colour_shift():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    assert metrics.ssim_y(image, image, 4) == pytest.approx(1.0)
    assert metrics.colour_shift(image, image) == pytest.approx(0.0, abs=1e-9)
    greyed = image.mean(axis=-1, keepdims=True).repeat(3, axis=-1)
    green = image * np.array([0.6, 1.0, 0.5], np.float32)
    assert metrics.colour_shift(green, greyed) > 5  # a green image turned grey is a visible shift
    assert metrics.ssim_y(np.clip(image + rng.normal(0, 0.1, image.shape), 0, 1), image, 4) < 0.95


@pytest.mark.parametrize("name", ["bicubic-x4", "mixed-x4", "realesrgan-x4", "noise-10", "jpeg-30"])
def test_recipes_are_deterministic_per_image(name):
    rng = np.random.default_rng(3)
    hr = mod_crop(rng.uniform(0, 1, (66, 70, 3)).astype(np.float32))
    assert hr.shape == (64, 68, 3)
    a, b = RECIPES[name].degrade(hr, "img"), RECIPES[name].degrade(hr, "img")
    assert a.shape == (16, 17, 3) and np.array_equal(a, b)
    if name in ("mixed-x4", "realesrgan-x4", "noise-10"):  # random recipes draw per image name
        assert not np.array_equal(a, RECIPES[name].degrade(hr, "other"))


def test_bicubic_recipe_is_pil_bicubic_of_the_8bit_image():
    hr = mod_crop(np.random.default_rng(1).uniform(0, 1, (32, 32, 3)).astype(np.float32))
    expected = np.asarray(Image.fromarray(metrics.to_uint8(hr)).resize((8, 8), Image.BICUBIC)) / 255
    assert np.allclose(RECIPES["bicubic-x4"].degrade(hr, "x"), expected, atol=1e-6)


def test_eval_command_scores_a_bundle_beside_bicubic(tmp_path, folded_bundle):
    data = tmp_path / "hr"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.uniform(0, 1, (48, 56, 3)) * 255).astype(np.uint8)).save(data / f"im{i}.png")
    result = CliRunner().invoke(eval_main, [f"mine={folded_bundle}", "--data", str(data), "--recipe",
                                            "bicubic-x4,noise-5", "-o", str(tmp_path / "out"), "--grid", "2",
                                            "-q"])
    assert result.exit_code == 0, result.output
    # the grid: a label row, then per image LR, bicubic, mine and HR crops of 48 px (the images' short side)
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.shape == (18 + 2 * 48, 4 * 48, 3)
    hr = np.asarray(Image.open(data / "im0.png"))
    assert np.array_equal(grid[18:18 + 48, 3 * 48:], hr[:48, 4:52])  # the HR column is the centre crop
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert {t["label"] for t in report["targets"]} == {"bicubic", "mine"}
    assert len(report["per_image"]) == 2 * 2 * 2  # recipes x images x targets
    bicubic = [s for s in report["summary"] if s["target"] == "bicubic"]
    assert all(s["gain_y"] == 0 for s in bicubic)
    assert "| bicubic-x4 | mine |" in (tmp_path / "out" / "eval.md").read_text()


def test_eval_command_refuses_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(eval_main, ["bicubic", "--data", str(tmp_path), "--recipe", "nope"])
    assert result.exit_code == 2 and "--recipe: unknown value 'nope'" in result.output
    result = runner.invoke(eval_main, [str(tmp_path), "--data", str(tmp_path)])
    assert result.exit_code == 2 and "neither a bundle" in result.output
