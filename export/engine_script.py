"""``build_engines.sh`` and ``verify_engines.sh``: the engine builds and their check, for the device.

A plan is tied to its GPU and TensorRT version, so a Jetson builds its own engines. The script
builds with **Polygraphy** (``polygraphy convert --convert-to trt``, as TensorRT's demo/Diffusion
does) through the device's Python ``tensorrt`` -- the same builder, flags, profiles, memory pools
(``--pool-limit tactic_dram:...`` keeps the Jetson cap), timing-cache locking and refit marking
(``engines/trt_postprocess.py``, a verbatim copy of ``runtime/trt_postprocess.py``) as
``mordasr-export --engines`` -- so both paths build the same engine. Only the graphs whose weights
differ between folded buckets are built refittable. ``BUILDER=trtexec`` is the fallback for a
device without Polygraphy: trtexec's ``--memPoolSize`` has no tactic-DRAM pool (the cap is dropped,
and the script says so) and it has no per-weight refit, so refittable builds on TensorRT 11.3+ are
refused there rather than built differently. The TensorRT version is the builder's own: Python's
``tensorrt`` for Polygraphy, trtexec's banner for trtexec.

``verify_engines.sh`` runs each graph in ONNX Runtime on seeded inputs at the profile's opt shape
and compares every built engine with it through ``polygraphy run``, with tolerances per precision
(widened to twice the largest error of the bundle's accuracy report where that is larger).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mordasr.errors import MordasrError
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.engine_names import TensorRTVersion
from mordasr.runtime.manifest import GraphSpec, Manifest
from mordasr.runtime.routing import MAX_WINDOWS
from mordasr.runtime.tolerances import bundle_tolerances
from mordasr.runtime.trt_postprocess import MARKS_FILE
from mordasr.runtime.trt_settings import EngineOptions, build_settings, engine_graphs, graph_refittable, profile_shapes

SCRIPT_NAME = "build_engines.sh"
VERIFY_NAME = "verify_engines.sh"
POSTPROCESS = "engines/trt_postprocess.py"
# The TensorRT API generations whose build settings differ (see runtime/trt_settings.py).
VARIANTS = {"10": TensorRTVersion(10), "11": TensorRTVersion(11), "11.3": TensorRTVersion(11, 3)}

_HEADER = r"""#!/usr/bin/env bash
# Build TensorRT engines for this mordasr bundle ({mode}, {precision}) on the device that runs them.
# Written by mordasr-export. Usage: bash build_engines.sh   (env: BUILDER=polygraphy|trtexec, SM,
# TRT_VERSION, TRTEXEC). Profiles in output pixels: min {min_size}, opt {opt_size}, max {max_size};
# batch up to {max_batch} image(s) per call, the router up to {router_batch} windows (what mordasr-run
# sends). Workspace {workspace} MiB{tactic_note}.
#
# BUILDER=polygraphy (the default where `pip install polygraphy` and the Python tensorrt that JetPack
# ships both import) builds exactly what `mordasr-export --engines` builds. BUILDER=trtexec cannot
# cap the builder's tactic DRAM (trtexec's --memPoolSize has no such pool) and cannot build
# refittable engines on TensorRT 11.3+ (REFIT_INDIVIDUAL exists only in the API): it refuses those.
set -euo pipefail
set -f  # the build arguments hold [shapes]: never glob them
cd "$(dirname "$0")"

BUILDER="${{BUILDER:-auto}}"
if [ "$BUILDER" = auto ]; then
    if command -v polygraphy >/dev/null && python3 -c 'import tensorrt; tensorrt.Builder' 2>/dev/null; then
        BUILDER=polygraphy
    else
        BUILDER=trtexec
    fi
fi
if [ "$BUILDER" = polygraphy ]; then
    # The version of the TensorRT that builds: Polygraphy builds with Python's tensorrt.
    TRT_VERSION="${{TRT_VERSION:-$(python3 -c 'import tensorrt; print(tensorrt.__version__)')}}"
elif [ "$BUILDER" = trtexec ]; then
    TRTEXEC="${{TRTEXEC:-$(command -v trtexec || true)}}"
    if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then
        TRTEXEC=/usr/src/tensorrt/bin/trtexec  # JetPack installs it here, off PATH
    fi
    if [ -z "$TRTEXEC" ]; then
        echo "build_engines.sh: neither Polygraphy (pip install polygraphy) nor trtexec is here;" \
            "set TRTEXEC=/path/to/trtexec" >&2
        exit 2
    fi
    if [ -z "${{TRT_VERSION:-}}" ]; then
        # The version of the trtexec that builds, from its banner: "[TensorRT v100300]" is 10.3.0.
        # (|| true: under pipefail a banner grep does not match would end the script silently.)
        code="$({{ "$TRTEXEC" --help 2>&1 || true; }} | grep -o 'TensorRT v[0-9]*' | head -n1 | tr -dc '0-9' || true)"
        if [ -n "$code" ]; then
            TRT_VERSION="$((code / 10000)).$((code / 100 % 100)).$((code % 100))"
        else
            echo "build_engines.sh: $TRTEXEC --help shows no [TensorRT vNNNNNN] banner;" \
                "set TRT_VERSION=10.3.0 (for example)" >&2
            exit 2
        fi
    fi
{tactic_warning}else
    echo "build_engines.sh: BUILDER must be polygraphy or trtexec, not $BUILDER" >&2
    exit 2
fi
if ! [[ "${{TRT_VERSION:-}}" =~ ^[0-9]+(\.[0-9]+)*$ ]]; then
    echo "build_engines.sh: cannot tell the TensorRT version (got '${{TRT_VERSION:-}}');" \
        "set TRT_VERSION=10.3.0 (for example)" >&2
    exit 2
fi
TRT_VERSION="$(echo "$TRT_VERSION" | awk -F. '{{printf "%d.%d.%d", $1, $2, $3}}')"
TRT_MAJOR="${{TRT_VERSION%%.*}}"
TRT_MINOR="$(echo "$TRT_VERSION" | cut -d. -f2)"
if [ "$TRT_MAJOR" -lt 10 ]; then
    echo "build_engines.sh: TensorRT $TRT_VERSION is too old; mordasr needs TensorRT 10 or 11" >&2
    exit 2
elif [ "$TRT_MAJOR" -eq 10 ]; then VARIANT=0
elif [ "$TRT_MINOR" -lt 3 ]; then VARIANT=1
else VARIANT=2
fi
if [ -z "${{SM:-}}" ]; then
    SM="$({{ nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true; }} \
        | head -n1 | tr -d '. ' || true)"
fi
if ! [[ "$SM" =~ ^[0-9]+$ ]]; then
    # Jetsons' nvidia-smi may print N/A or nothing: engines named sm$SM would never be found
    echo "build_engines.sh: cannot read the GPU's compute capability (got '$SM');" \
        "set SM (87 for Jetson Orin, 110 for Thor)" >&2
    exit 2
fi
mkdir -p engines
TIMING_CACHE="engines/timing.sm${{SM}}.trt${{TRT_VERSION}}.cache"
echo "building with $BUILDER, TensorRT $TRT_VERSION, sm$SM"

build() {{  # build GRAPH ENGINE KEY PG_ARGS(3 variants) TRTEXEC_ARGS(3 variants)
    local graph="$1" engine="$2" key="$3" args
    local variants=("$4" "$5" "$6" "$7" "$8" "$9")
    if [ "$BUILDER" = polygraphy ]; then args="${{variants[$VARIANT]}}"
    else args="${{variants[$((VARIANT + 3))]}}"; fi
    if [ "$args" = REFUSED ]; then
        echo "build_engines.sh: trtexec cannot build $engine the way mordasr does (a refittable" \
            "engine on TensorRT 11.3+ needs REFIT_INDIVIDUAL with marked weights);" \
            "pip install polygraphy and run with BUILDER=polygraphy" >&2
        exit 2
    fi
    echo "== $graph -> $engine"
    if [ "$BUILDER" = polygraphy ]; then
        # shellcheck disable=SC2086  # args is a word list on purpose
        MORDASR_REFIT_GRAPH="$key" polygraphy convert "$graph" --convert-to trt -o "$engine.partial" $args \
            --pool-limit {pools} --builder-optimization-level {opt_level} \
            --load-timing-cache "$TIMING_CACHE" --save-timing-cache "$TIMING_CACHE"
    else
        # shellcheck disable=SC2086
        "$TRTEXEC" --onnx="$graph" --saveEngine="$engine.partial" $args \
            --timingCacheFile="$TIMING_CACHE" --memPoolSize=workspace:{workspace}M \
            --builderOptimizationLevel={opt_level} --skipInference
    fi
    mv "$engine.partial" "$engine"  # an interrupted build leaves no engine the runtime would load
}}

"""

def _shape_args(profile: dict[str, list[list[int]]], style: str) -> list[str]:
    args = []
    if style == "polygraphy":
        for flag, i in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args.append(flag)
            args += [f"{name}:[{','.join(map(str, s[i]))}]" for name, s in profile.items()]
        return args
    for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        args.append(f"{flag}=" + ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in profile.items()))
    return args


def _variant_args(manifest: Manifest, graph: GraphSpec, options: EngineOptions, profile: dict,
                  version: TensorRTVersion, builder: str, marked: bool) -> str:
    settings = build_settings(version, graph.precision, graph_refittable(manifest, graph, options.refittable),
                              options.strongly_typed if version.major == 10 else None)
    if builder == "polygraphy":
        args = settings.polygraphy_args()
        if settings.refit_only_packs and marked:
            args += ["--trt-npps", f"{POSTPROCESS}:mark_pack_weights"]
        if "REFIT_INDIVIDUAL" in settings.builder_flags:
            args += ["--trt-cpps", f"{POSTPROCESS}:refit_individual"]
    else:
        try:
            args = settings.trtexec_args()
        except MordasrError:
            return "REFUSED"
    args += _shape_args(profile, builder)
    if any(not a or any(c.isspace() or c in "'\"$`\\*?" for c in a) for a in args):
        raise MordasrError(f"{graph.file}: an input name or flag cannot be written into the build script: {args}")
    return " ".join(args)  # split into words by the script, which disables globbing (set -f)


def build_script(manifest: Manifest, options: EngineOptions, marked: frozenset[str] | set[str] = frozenset()) -> str:
    pools = " ".join(f"{name.lower()}:{mb}M" for name, mb in options.pool_limits_mb().items())
    tactic_note = f", builder tactic DRAM capped at {options.tactic_dram_mb} MiB" if options.tactic_dram_mb else ""
    tactic_warning = ""
    if options.tactic_dram_mb:
        tactic_warning = (f'    echo "build_engines.sh: warning: trtexec cannot cap tactic DRAM at '
                          f'{options.tactic_dram_mb} MiB (no such --memPoolSize pool); builds may run out of '
                          f'memory on a Jetson: pip install polygraphy keeps the cap" >&2\n')
    text = _HEADER.format(mode=manifest.mode, precision=manifest.precision, min_size=options.min_size,
                          opt_size=options.opt_size, max_size=options.max_size, max_batch=manifest.max_batch,
                          router_batch=MAX_WINDOWS * manifest.max_batch, workspace=options.workspace_mb,
                          opt_level=options.optimization_level, pools=pools, tactic_note=tactic_note,
                          tactic_warning=tactic_warning)
    lines = []
    for graph in engine_graphs(manifest, options.refittable):
        profile = profile_shapes(manifest, graph, options.min_size, options.opt_size, options.max_size)
        engine = f"engines/{graph.key}.sm${{SM}}.trt${{TRT_VERSION}}.{graph.precision}.plan"
        variants = [_variant_args(manifest, graph, options, profile, v, b, graph.key in marked)
                    for b in ("polygraphy", "trtexec") for v in VARIANTS.values()]
        lines.append(f"build {shlex.quote(graph.file)} \"{engine}\" {shlex.quote(graph.key)} "
                     + " ".join(shlex.quote(v) for v in variants))
    lines.append('echo "engines written to $(pwd)/engines; check them with: bash verify_engines.sh"')
    return text + "\n".join(lines) + "\n"


def refit_marks(bundle_dir: Path, manifest: Manifest, options: EngineOptions) -> dict[str, list[str]]:
    """{graph key: its weight-pack tensor names} for each graph built refittable."""
    from mordasr.runtime.trt_build import pack_names

    return {g.key: pack_names(bundle_dir, manifest, g) for g in engine_graphs(manifest, options.refittable)
            if graph_refittable(manifest, g, options.refittable)}


def verify_script(bundle_dir: Path, manifest: Manifest, options: EngineOptions) -> str:
    lines = ["#!/usr/bin/env bash",
             "# Compare every built engine with ONNX Runtime on the same seeded inputs (written by mordasr-export).",
             "# Needs: pip install polygraphy onnxruntime; the Python tensorrt the engines were built with.",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "mkdir -p engines/verify", "status=0",
             'for plan in engines/*.plan; do',
             '    [ -e "$plan" ] || { echo "no engines: run build_engines.sh first" >&2; exit 2; }; break',
             'done',
             ""]
    graphs = engine_graphs(manifest, options.refittable)
    tolerances = bundle_tolerances(bundle_dir, graphs)
    for graph in graphs:
        profile = profile_shapes(manifest, graph, options.min_size, options.opt_size, options.max_size)
        shapes = " ".join(f"{name}:[{','.join(map(str, s[1]))}]" for name, s in profile.items())
        atol, rtol = tolerances[graph.key]
        ref = f"engines/verify/{graph.key}"
        lines += [f"# {graph.key} ({graph.precision}): atol {atol:g}, rtol {rtol:g}",
                  f"polygraphy run {shlex.quote(graph.file)} --onnxrt --input-shapes {shapes} --val-range [0,1] "
                  f"--seed 0 --save-inputs {ref}.inputs.json --save-outputs {ref}.onnxrt.json",
                  f"for plan in engines/{graph.key}.sm*.{graph.precision}.plan; do",
                  f"    polygraphy run \"$plan\" --model-type engine --trt --load-inputs {ref}.inputs.json "
                  f"--load-outputs {ref}.onnxrt.json --atol {atol:g} --rtol {rtol:g} || status=1",
                  "done", ""]
    lines += ['if [ "$status" -eq 0 ]; then echo "every engine matches ONNX Runtime"',
              'else echo "some engines differ: see above" >&2; fi',
              'exit "$status"']
    return "\n".join(lines) + "\n"


def write_engine_scripts(bundle_dir: str | Path, manifest: Manifest, options: EngineOptions) -> list[Path]:
    """``build_engines.sh``, ``verify_engines.sh`` and, for Polygraphy, ``engines/trt_postprocess.py``
    (a copy of ``runtime/trt_postprocess.py``) with the names it marks in ``engines/refit_marks.json``."""
    from mordasr.runtime import trt_postprocess

    bundle_dir = Path(bundle_dir)
    marks = refit_marks(bundle_dir, manifest, options)
    module = Path(trt_postprocess.__file__).read_text()
    return [atomic_write(bundle_dir / SCRIPT_NAME, build_script(manifest, options, set(marks)), mode=0o755),
            atomic_write(bundle_dir / VERIFY_NAME, verify_script(bundle_dir, manifest, options), mode=0o755),
            atomic_write(bundle_dir / POSTPROCESS, module),
            atomic_write(bundle_dir / "engines" / MARKS_FILE, json.dumps(marks, indent=1) + "\n")]
