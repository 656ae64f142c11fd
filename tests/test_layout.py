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


def _package(path: Path) -> list[str]:
    """The package a file of the repository belongs to, as mordasr names it (runtime/x.py is in
    mordasr.runtime; mordasr/x.py in mordasr)."""
    parts = list(path.relative_to(ROOT).parent.parts)
    return ["mordasr"] + (parts[1:] if parts and parts[0] == "mordasr" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth, relative imports resolved to absolute names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module))
                continue
            package = _package(path)[: len(_package(path)) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
            found += [(node.lineno, base if node.module else f"{base}.{alias.name}") for alias in node.names]
    return found


# Runtime code outside runtime/ and serving/: the Triton pipeline model runs inside Triton's Python
# backend, where only the runtime is installed.
RUNTIME_FILES = [ROOT / "export" / "triton_pipeline.py"]


@pytest.mark.parametrize("folder", ["runtime", "serving", "triton_pipeline"])
def test_runtime_and_serving_import_nothing_from_the_training_side(folder):
    files = RUNTIME_FILES if folder == "triton_pipeline" else sorted((ROOT / folder).rglob("*.py"))
    assert files
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in files for line, name in _imports(path)
                 if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not offending, "\n".join(offending)


def test_the_check_would_catch_an_import_inside_a_function_or_a_relative_one(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mordasr.export.engines import build_engines\n")
    assert (2, "mordasr.export.engines") in _imports(source)
    relative = ROOT / "runtime" / "backends" / "_layout_probe.py"
    relative.write_text("from ...export import engines\nfrom ..pipeline import Restorer\n")
    try:
        found = _imports(relative)
    finally:
        relative.unlink()
    assert (1, "mordasr.export") in found and (2, "mordasr.runtime.pipeline") in found


def test_importing_the_runtime_and_serving_loads_no_torch():
    code = ("import sys, mordasr.runtime, mordasr.runtime.cli, mordasr.runtime.backends.tensorrt, "
            "mordasr.runtime.trt_build, mordasr.serving.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_runtime_needs_only_the_mordasr_modules_its_wheel_ships():
    """The runtime wheel (packaging/build_runtime_wheel.py) copies a few modules of mordasr/ beside
    runtime/ and serving/; runtime code importing any other one would fail on a Jetson."""
    import re

    script = (ROOT / "packaging" / "build_runtime_wheel.py").read_text()
    shipped = {name.removesuffix(".py") for name in re.findall(r'"(\w+\.py)"', script)} - {"__init__"}
    files = sorted((ROOT / "runtime").rglob("*.py")) + sorted((ROOT / "serving").rglob("*.py")) + RUNTIME_FILES
    root_modules = {p.stem for p in (ROOT / "mordasr").glob("*.py")} | {
        p.name for p in (ROOT / "mordasr").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in files
                 for line, name in _imports(path)
                 if name.startswith("mordasr.") and name.split(".")[1] in root_modules - shipped]
    assert shipped >= {"errors", "lazy", "cli_errors", "records"} and not offending, "\n".join(offending)
