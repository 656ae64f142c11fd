"""The README's main job, run as a user runs it: restored held-out image vs bicubic upsampling."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def _demo(tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mordasr-demo")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mordasr.demo"]
    return subprocess.run(cmd + ["--out", str(tmp_path / "demo"), "-q", *args], capture_output=True, text=True,
                          timeout=1500)


def test_demo_smoke(tmp_path):
    """The demo's whole path, fast: 2 adapter steps on the fidelity base, one bucket."""
    proc = _demo(tmp_path, "--base", "tiny", "--steps", "2", "--buckets", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"MoR-DASR tiny \(mor, folded\)\s+[\d.]+\s+[\d.]+", proc.stdout), proc.stdout
    for name in ("lr", "bicubic", "restored", "hr"):
        assert (tmp_path / "demo" / f"{name}.png").is_file()


@pytest.mark.slow
def test_demo_beats_bicubic(tmp_path):
    """The README's main job as a user runs it, on the fidelity base: its figures are the README's."""
    proc = _demo(tmp_path, "--base", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    bicubic = re.search(r"bicubic upsampling\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    ours = re.search(r"MoR-DASR tiny \(mor, folded\)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    assert bicubic and ours, proc.stdout
    psnr_bicubic, psnr_ours = float(bicubic.group(1)), float(ours.group(1))
    # README: 23.61 vs 22.88 dB with the shipped base; held to a bit over half of that margin
    assert psnr_ours >= psnr_bicubic + 0.40, f"restored {psnr_ours} dB vs bicubic {psnr_bicubic} dB"
    # The demo image (blur 1.2, noise 8/255, JPEG q60) is clearly degraded: the router must not
    # send it to a bucket whose centre scores nothing as degraded (labelled "mild").
    bucket = re.search(r"-> bucket b\d+-(\S+)", proc.stdout)
    assert bucket and bucket.group(1) != "mild", proc.stdout
    for name in ("lr", "bicubic", "restored", "hr"):
        assert (tmp_path / "demo" / f"{name}.png").is_file()
    assert Image.open(tmp_path / "demo" / "restored.png").size == Image.open(tmp_path / "demo" / "hr.png").size


@pytest.mark.slow
def test_default_demo_on_the_student_agrees_with_its_teacher(tmp_path):
    """The README's main job as written: the student base, compared with its teacher when the
    teacher is installed (pip install '.[teacher]')."""
    proc = _demo(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(proc.stdout)
    bicubic = re.search(r"bicubic upsampling\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    ours = re.search(r"MoR-DASR esrgan-student \(mor, folded\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    if bicubic is None:
        pytest.skip("the teacher is not installed here (pip install '.[teacher]'): " + proc.stdout[-300:])
    assert ours, proc.stdout
    # README: the restored image agrees with the teacher better than bicubic does (by at least
    # 1 dB PSNR against the teacher's output; measured 1.8) and stays at least 0.4 dB above bicubic
    # against HR (measured 0.78)
    assert float(ours.group(3)) >= float(bicubic.group(3)) + 1.0, proc.stdout
    assert float(ours.group(1)) >= float(bicubic.group(1)) + 0.4, proc.stdout
    assert (tmp_path / "demo" / "teacher.png").is_file()
