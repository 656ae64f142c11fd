"""The runtime-only wheel installs into a fresh virtual environment without torch and restores
an image with a bundle (slow: builds a wheel and installs numpy, Pillow and onnxruntime)."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_runtime_wheel_in_a_fresh_venv(folded_bundle, tmp_path):
    sys.path.insert(0, str(ROOT / "packaging"))
    from build_runtime_wheel import build

    wheel = build(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mordasr/runtime/pipeline.py" in names and "mordasr/errors.py" in names
    assert "mordasr/runtime/device_profiles/orin-nano-8gb.json" in names
    assert "mordasr/serving/app.py" in names and "mordasr/runtime/jobs.py" in names
    assert not [n for n in names if n.startswith(("mordasr/model", "mordasr/export", "mordasr/training"))]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, timeout=900)
    from mordasr.runtime.images import write_image

    write_image(tmp_path / "in.png", np.random.default_rng(0).uniform(0, 1, (12, 12, 3)).astype(np.float32))
    run = env_dir / "bin" / "mordasr-run"
    proc = subprocess.run([str(run), str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--bundle",
                           str(folded_bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out.png").is_file()
    serve = subprocess.run([str(env_dir / "bin" / "mordasr-serve"), "--help"], capture_output=True, text=True)
    assert serve.returncode == 0 and "POST an image" in serve.stdout
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes((tmp_path / "in.png").read_bytes())
    no_ray = subprocess.run([str(run), str(folder), "-o", str(tmp_path / "o"), "--bundle", str(folded_bundle),
                             "--ray"], capture_output=True, text=True, timeout=300)
    assert no_ray.returncode == 2 and "pip install 'mordasr[serve]'" in no_ray.stderr  # Ray is not installed
    assert "Traceback" not in no_ray.stderr
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "None"  # torch is not even installed
