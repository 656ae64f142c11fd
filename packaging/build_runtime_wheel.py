"""Build ``mordasr-runtime``: the lean runtime alone (numpy, Pillow, onnxruntime, onnx; no torch).

    python packaging/build_runtime_wheel.py -o dist/

The wheel holds ``mordasr`` (version, errors, the CLI error path, the lazy-import helper and the
record loader only),
``mordasr.runtime`` and its backends, and ``mordasr.serving`` (Ray imported only when used), with the
``mordasr-run`` and
``mordasr-serve`` commands. It is an alternative to the full ``mordasr`` distribution for
devices that only run bundles (a Jetson); install one or the other, not both.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PYPROJECT = """[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "mordasr-runtime"
version = "{version}"
description = "The lean MoR-DASR runtime: run mordasr bundles with ONNX Runtime or TensorRT, no torch"
requires-python = ">=3.10"
license = {{ text = "Apache-2.0" }}
dependencies = ["numpy>=1.24", "pillow>=10.2", "click>=8.1", "tqdm>=4.66", "onnxruntime>=1.18",
                "safetensors>=0.4", "onnx>=1.16"]

[project.optional-dependencies]
tensorrt = ["tensorrt>=10.0", "cuda-python>=12.0"]
serve = ["ray[serve,data]>=2.9", "python-multipart>=0.0.9"]

[project.scripts]
mordasr-run = "mordasr.runtime.cli:main"
mordasr-serve = "mordasr.serving.cli:main"

[tool.setuptools]
packages = ["mordasr", "mordasr.runtime", "mordasr.runtime.backends", "mordasr.serving"]

[tool.setuptools.package-data]
"mordasr.runtime" = ["device_profiles/*.json"]
"""


def build(out: Path) -> Path:
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "mordasr" / "__init__.py").read_text()).group(1)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "mordasr").mkdir()
        for name in ("__init__.py", "errors.py", "cli_errors.py", "lazy.py", "records.py"):
            shutil.copy2(ROOT / "mordasr" / name, stage / "mordasr" / name)
        for folder in ("runtime", "serving"):
            shutil.copytree(ROOT / folder, stage / "mordasr" / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (stage / "pyproject.toml").write_text(PYPROJECT.format(version=version))
        (stage / "README.md").write_text("mordasr-runtime: see the mordasr README.\n")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                        "-w", str(out), str(stage)], check=True)
    return next(out.glob(f"mordasr_runtime-{version}-*.whl"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "dist")
    print(build(parser.parse_args().out))
