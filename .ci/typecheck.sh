#!/usr/bin/env bash
# Type-check every module that calls TensorRT against TensorRT's own Python API.
# tensorrt-stubs (the typed surface of TensorRT 10.13) goes into .typing/stubs, never into the venv:
# installed there, it would make `import tensorrt` succeed as an empty namespace package.
# mypy cannot follow setuptools' package-dir mapping, so .typing/src links the folders under their
# import names (mordasr.runtime -> runtime/, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -f .typing/stubs/tensorrt/__init__.pyi ]; then
    "$PY" -m pip install -q --no-deps --disable-pip-version-check --target .typing/stubs -c constraints.txt tensorrt-stubs
    # Two generator slips in the stubs stop mypy parsing the whole file: plugin methods name a
    # parameter `in` (a Python keyword), and add_scale_nd puts channel_axis (no default) after
    # defaulted parameters. Neither is called here; rename the one, give the other a default.
    sed -i -E -e 's/([(,] ?)in: /\1in_: /g' -e 's/power: Weights = None, channel_axis: int\)/power: Weights = None, channel_axis: int = 0)/' \
        .typing/stubs/tensorrt_bindings/tensorrt.pyi
fi
rm -rf .typing/src && mkdir -p .typing/src/mordasr
for f in mordasr/*.py; do ln -s "$PWD/$f" ".typing/src/mordasr/$(basename "$f")"; done
for d in model training export calib runtime serving benchmarks tests; do ln -s "$PWD/$d" ".typing/src/mordasr/$d"; done
# The TensorRT builder and runtime, the postprocess module build_engines.sh points Polygraphy at, the
# typed CUDA calls, and the test stand-in whose classes must keep TensorRT's own signatures.
MYPYPATH=.typing/stubs:.typing/src "$PY" -m mypy --config-file pyproject.toml \
    -p mordasr.runtime.trt_build -p mordasr.runtime.backends.tensorrt -p mordasr.export.engines \
    -p mordasr.export.engine_script -p mordasr.runtime.trt_settings -p mordasr.lazy \
    -p mordasr.runtime.trt_postprocess -p mordasr.runtime.cuda_runtime -p mordasr.tests.tensorrt_standin
