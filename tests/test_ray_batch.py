"""mordasr-run --ray: a folder restored by a Ray Data pipeline with 2 workers on the CPU gives the
same files as the single-process folder mode, reports bad files, and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _run(args: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mordasr-run")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mordasr.runtime.cli"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


@pytest.mark.slow
def test_ray_folder_mode_equals_single_process(folded_bundle, tmp_path):
    pytest.importorskip("ray.data", reason="needs Ray Data (pip install 'mordasr[serve]')")
    rng = np.random.default_rng(11)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (12 + 4 * i, 16, 3), dtype=np.uint8)).save(src / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8)).save(src / "sub" / "alpha.png")
    (src / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")

    common = ["--bundle", str(folded_bundle), "--threads", "1"]
    single = _run([str(src), "-o", str(tmp_path / "single")] + common)
    assert single.returncode == 1, single.stderr  # the broken file
    ray = _run([str(src), "-o", str(tmp_path / "ray")] + common + ["--ray", "--workers", "2"])
    assert ray.returncode == 1, ray.stderr
    assert "sub/broken.jpg" in ray.stderr and "1 of 7 images failed" in ray.stderr
    assert "6 restored by 2 workers" in ray.stdout

    outputs = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
    assert len(outputs) == 6
    assert outputs == sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    for rel in outputs:
        assert (tmp_path / "single" / rel).read_bytes() == (tmp_path / "ray" / rel).read_bytes(), rel

    # resume: only the missing output is restored again
    (tmp_path / "ray" / "3.png").unlink()
    again = _run([str(src), "-o", str(tmp_path / "ray")] + common + ["--ray", "--workers", "2", "--skip-existing"])
    assert again.returncode == 1  # the broken file still fails, and says so
    assert "skipped 5 images whose output exists" in again.stdout
    assert "1 restored by 2 workers" in again.stdout
    assert (tmp_path / "ray" / "3.png").read_bytes() == (tmp_path / "single" / "3.png").read_bytes()
