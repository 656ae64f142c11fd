"""Command lines through click's runner and as subprocesses: success paths and bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mordasr.export.cli import main as export_main
from mordasr.model.io import save_checkpoint
from mordasr.runtime.cli import main as run_main


def _image(path: Path, size=(10, 8)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _run(args):
    return CliRunner().invoke(run_main, [str(a) for a in args])


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_run_single_image(folded_bundle, tmp_path):
    src = _image(tmp_path / "in.png")
    result = _run([src, "-o", tmp_path / "out.png", "--bundle", folded_bundle])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out.png").size == (40, 32)
    assert "bucket" in result.stdout


def test_run_shows_tile_progress_for_a_tiled_image_and_not_when_quiet(folded_bundle, tmp_path):
    """A large photograph takes minutes on a CPU: its tiles get a bar (tiles/s, ETA) on stderr,
    gone when the image is done; -q prints nothing; the file is the same either way."""
    src = _image(tmp_path / "in.png", (40, 30))
    loud = _run([src, "-o", tmp_path / "loud.png", "--bundle", folded_bundle, "--tile", "16"])
    assert loud.exit_code == 0, loud.output
    assert re.search(r"\d/9 \[", loud.stderr) and "tile/s" in loud.stderr  # 3 x 3 tiles of 16 LR px
    quiet = _run([src, "-o", tmp_path / "quiet.png", "--bundle", folded_bundle, "--tile", "16", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    assert (tmp_path / "loud.png").read_bytes() == (tmp_path / "quiet.png").read_bytes()


def test_run_bad_inputs_fail_with_one_line_and_no_output(folded_bundle, tmp_path):
    good = _image(tmp_path / "good.png", (32, 32))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is text")
    tampered = tmp_path / "tampered"
    shutil.copytree(folded_bundle, tampered)
    with open(tampered / "decoder.onnx", "ab") as f:
        f.write(b"x")
    cases = [
        ([good, "--bundle", tmp_path / "missing-bundle"], "does not exist"),
        ([corrupt, "--bundle", folded_bundle], "corrupt"),
        ([not_image, "--bundle", folded_bundle], "not an image"),
        ([good, "--bundle", tampered], "sha256"),
        ([tmp_path / "nope.png", "--bundle", folded_bundle], "no such file"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}.png"
        result = _run([args[0], "-o", out, *args[1:]])
        assert result.exit_code == 2, (message, result.output)
        lines = _error_lines(result)
        assert len(lines) == 1 and message in lines[0], (message, result.stderr)
        assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_run_folder_keeps_layout_and_reports_failures(folded_bundle, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    _image(src / "a.png")
    _image(src / "sub" / "b.jpg")
    (src / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (src / "readme.txt").write_text("ignored")
    result = _run([src, "-o", tmp_path / "out", "--bundle", folded_bundle, "-q"])
    assert result.exit_code == 1
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "sub" / "b.jpg").is_file()
    assert not (tmp_path / "out" / "sub" / "broken.png").exists()
    assert "1 of 3 images failed" in result.stderr


def test_run_help_explains_exit_codes():
    result = CliRunner().invoke(run_main, ["--help"])
    assert result.exit_code == 0 and "Exit codes" in result.output and "--bundle" in result.output


def test_run_as_subprocess(gated_bundle, tmp_path):
    src = _image(tmp_path / "in.png", (6, 6))
    exe = Path(sys.executable).with_name("mordasr-run")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mordasr.runtime.cli"]
    proc = subprocess.run(cmd + [str(src), "-o", str(tmp_path / "o.png"), "--bundle", str(gated_bundle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "o.png").size == (24, 24)
    proc = subprocess.run(cmd + [str(tmp_path / "missing.png"), "-o", str(tmp_path / "p.png"),
                                 "--bundle", str(gated_bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr


def test_export_cli(tiny_model, tmp_path):
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(out), "--mode", "folded",
                                              "--buckets", "2", "--calib-samples", "16", "-q",
                                              "--triton", str(tmp_path / "triton")])
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and (out / "unet.b1.onnx").is_file()
    assert (tmp_path / "triton" / "mordasr_unet_b1" / "1" / "model.onnx").is_file()
    assert (tmp_path / "triton" / "mordasr" / "1" / "model.py").is_file()
    again = CliRunner().invoke(export_main, [str(ckpt), "-o", str(out), "-q"])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_export_cli_bad_checkpoints(tiny_model, tmp_path):
    from mordasr.model import OneStepSR

    result = CliRunner().invoke(export_main, [str(tmp_path / "none"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a mordasr checkpoint" in result.stderr
    base = save_checkpoint(OneStepSR(tiny_model.config, with_adapters=False), tmp_path / "base")
    result = CliRunner().invoke(export_main, [str(base), "-o", str(tmp_path / "b")])
    assert result.exit_code == 2 and "without adapters" in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_cli_int8_writes_both_bundles(tiny_model, tmp_path):
    from mordasr.runtime import load_manifest

    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(export_main, [str(ckpt), "-o", str(out), "--mode", "gated", "--int8",
                                              "--calib-samples", "16", "-q"])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).precision == "int8"
    assert load_manifest(tmp_path / "bundle-fp32").precision == "fp32"
    assert (out / "accuracy.md").is_file()
