"""The package's boundaries: the lean runtime and the serving layer import no torch and nothing
from the training side (model/, training/, export/, calib/), anywhere in their code, including
imports inside functions; and importing them in a fresh process loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision", "diffusers", "open_clip", "mordasr.model", "mordasr.training",
             "mordasr.export", "mordasr.calib", "mordasr.benchmarks")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("folder", ["runtime", "serving"])
def test_runtime_and_serving_import_nothing_from_the_training_side(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in files for line, name in _imports(path)
                 if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not offending, "\n".join(offending)


def test_the_check_would_catch_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mordasr.export.engines import build_engines\n")
    assert (2, "mordasr.export.engines") in _imports(source)


def test_importing_the_runtime_and_serving_loads_no_torch():
    code = ("import sys, mordasr.runtime, mordasr.runtime.cli, mordasr.runtime.backends.tensorrt, "
            "mordasr.runtime.trt_build, mordasr.serving.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
