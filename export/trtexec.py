"""``build_engines.sh``: the engine builds as ``trtexec`` lines, for a device where the exporter
could not import TensorRT (a Jetson builds its own engines: plans are tied to GPU and version).

The script finds trtexec, reads the TensorRT version and the GPU's compute capability, and picks
the TensorRT 10 or 11 flags computed by ``tensorrt_config`` (the same logic the Python builder
uses). Engine names follow ``engine_file_name``, which is how the runtime finds them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from mordasr.export.engines import EngineOptions, engine_graphs
from mordasr.export.tensorrt_config import build_settings, format_shape, profile_shapes
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.engine_names import TensorRTVersion
from mordasr.runtime.manifest import Manifest

SCRIPT_NAME = "build_engines.sh"

_HEADER = r"""#!/usr/bin/env bash
# Build TensorRT engines for this mordasr bundle ({mode}, {precision}) on the device that will run them.
# Written by mordasr-export. Usage: bash build_engines.sh   (env: TRTEXEC, SM, TRT_VERSION)
# Profiles in output pixels: min {min_size}, opt {opt_size}, max {max_size}; batch {batch}.
set -euo pipefail
cd "$(dirname "$0")"

TRTEXEC="${{TRTEXEC:-$(command -v trtexec || true)}}"
if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then
    TRTEXEC=/usr/src/tensorrt/bin/trtexec  # JetPack installs it here, off PATH
fi
if [ -z "$TRTEXEC" ]; then
    echo "build_engines.sh: trtexec not found; set TRTEXEC=/path/to/trtexec" >&2
    exit 2
fi
if [ -z "${{TRT_VERSION:-}}" ]; then
    TRT_VERSION="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
fi
if [ -z "$TRT_VERSION" ]; then
    # trtexec's banner: "[TensorRT v100300] ..." encodes 10.3.0
    code="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc '0-9')"
    if [ -n "$code" ]; then
        TRT_VERSION="$((code / 10000)).$((code / 100 % 100)).$((code % 100))"
    fi
fi
if [ -z "$TRT_VERSION" ]; then
    echo "build_engines.sh: cannot tell the TensorRT version; set TRT_VERSION=10.3.0 (for example)" >&2
    exit 2
fi
TRT_VERSION="$(echo "$TRT_VERSION" | awk -F. '{{printf "%d.%d.%d", $1, $2, $3}}')"
TRT_MAJOR="${{TRT_VERSION%%.*}}"
if [ -z "${{SM:-}}" ]; then
    SM="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '. ' || true)"
fi
if [ -z "$SM" ]; then
    echo "build_engines.sh: cannot read the GPU's compute capability; set SM (87 for Jetson Orin)" >&2
    exit 2
fi
if [ "$TRT_MAJOR" -lt 10 ]; then
    echo "build_engines.sh: TensorRT $TRT_VERSION is too old; mordasr needs TensorRT 10 or 11" >&2
    exit 2
fi
mkdir -p engines
TIMING_CACHE="engines/timing.sm${{SM}}.trt${{TRT_VERSION}}.cache"

build() {{  # build GRAPH ENGINE FLAGS_TRT10 FLAGS_TRT11 SHAPE_ARGS...
    local graph="$1" engine="$2" flags
    if [ "$TRT_MAJOR" -ge 11 ]; then flags="$4"; else flags="$3"; fi
    shift 4
    echo "== $graph -> $engine ${{flags:-(precision from the graph)}}"
    # shellcheck disable=SC2086  # flags is a word list on purpose
    "$TRTEXEC" --onnx="$graph" --saveEngine="$engine.partial" "$@" $flags \
        --timingCacheFile="$TIMING_CACHE" --memPoolSize=workspace:{workspace}M \
        --builderOptimizationLevel={opt_level} --skipInference
    mv "$engine.partial" "$engine"  # an interrupted build leaves no engine the runtime would load
}}

"""


def _flags(major: int, precision: str, options: EngineOptions) -> str:
    settings = build_settings(TensorRTVersion(major), precision, options.refittable,
                              options.strongly_typed if major == 10 else None)
    return " ".join(settings.trtexec_args())


def trtexec_script(manifest: Manifest, options: EngineOptions) -> str:
    text = _HEADER.format(mode=manifest.mode, precision=manifest.precision, min_size=options.min_size,
                          opt_size=options.opt_size, max_size=options.max_size,
                          batch="/".join(map(str, options.batch)), workspace=options.workspace_mb, opt_level=options.optimization_level)
    lines = []
    for graph in engine_graphs(manifest, options.refittable):
        profile = profile_shapes(manifest, graph, options.min_size, options.opt_size,
                                 options.max_size, options.batch)
        args = []
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(format_shape(n, s[i]) for n, s in profile.items()))
        engine = f"engines/{graph.key}.sm${{SM}}.trt${{TRT_VERSION}}.{graph.precision}.plan"
        flags = [shlex.quote(_flags(major, graph.precision, options)) for major in (10, 11)]
        lines.append(f"build {shlex.quote(graph.file)} \"{engine}\" {flags[0]} {flags[1]} "
                     + " ".join(shlex.quote(a) for a in args))
    lines.append('echo "engines written to $(pwd)/engines"')
    return text + "\n".join(lines) + "\n"


def write_trtexec_script(bundle_dir: str | Path, manifest: Manifest, options: EngineOptions) -> Path:
    return atomic_write(Path(bundle_dir) / SCRIPT_NAME, trtexec_script(manifest, options), mode=0o755)
