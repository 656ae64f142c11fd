"""Build one TensorRT engine from one bundle graph with Polygraphy's loaders.

The exporter (``mordasr-export --engines``) and the runtime's engine cache (a miss on the device)
both build here, so an engine is the same whichever side built it. Polygraphy does what NVIDIA's
own demo/Diffusion relies on it for: parsing (``NetworkFromOnnxPath``, external weights resolved
beside the graph), the builder config (``CreateConfig``: precision flags, shape profiles, memory
pools, refit, optimization level, timing cache) and the build (``EngineBytesFromNetwork``, which
locks the timing cache file and combines it with what other builds wrote before saving, so two
builders sharing a device's cache lose nothing). mordasr adds what only TensorRT's API can say:
REFIT_INDIVIDUAL and the weights it may refit (``runtime/trt_postprocess.py``, the module
``build_engines.sh`` points Polygraphy at), with every call checked.

``tensorrt`` and ``polygraphy`` are imported lazily; under ``TYPE_CHECKING`` mypy reads the real
TensorRT API (``tensorrt-stubs``), so a misspelt method fails CI, not a Jetson.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mordasr.errors import MordasrError
from mordasr.lazy import lazy_import
from mordasr.runtime.engine_names import TensorRTVersion
from mordasr.runtime.manifest import GraphSpec, Manifest
from mordasr.runtime.trt_postprocess import mark_refittable, refit_individual
from mordasr.runtime.trt_settings import (
    BuildSettings,
    EngineOptions,
    build_settings,
    graph_refittable,
    profile_shapes,
)

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = lazy_import("tensorrt", "building TensorRT engines")

polygraphy_trt = lazy_import("polygraphy.backend.trt", "building TensorRT engines", "polygraphy")


def tensorrt_version() -> TensorRTVersion:
    """The installed TensorRT's version (raises ``MissingDependency`` where it does not import)."""
    return TensorRTVersion.parse(trt.__version__)


def _mark(names: Sequence[str]) -> Callable[..., None]:
    """A Polygraphy network postprocess marking exactly ``names`` refittable."""
    def postprocess(network: trt.INetworkDefinition) -> None:
        try:
            mark_refittable(network, names)
        except RuntimeError as err:
            raise MordasrError(str(err)) from None

    return postprocess


def memory_pools(options: EngineOptions) -> dict[trt.MemoryPoolType, int]:
    return {getattr(trt.MemoryPoolType, name): mb << 20 for name, mb in options.pool_limits_mb().items()}


def engine_loader(onnx_path: Path, settings: BuildSettings, profile: dict[str, list[list[int]]],
                  options: EngineOptions, timing_cache: Path, refit_names: Sequence[str] = ()):
    """Polygraphy's lazy chain for one engine; calling it builds and returns the serialized plan."""
    p = polygraphy_trt
    network = p.NetworkFromOnnxPath(str(onnx_path), strongly_typed="STRONGLY_TYPED" in settings.network_flags)
    if settings.refit_only_packs:
        network = p.PostprocessNetwork(network, _mark(refit_names), name="mark_refittable")
    shapes = p.Profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.add(name, min=lo, opt=opt, max=hi)
    config = p.CreateConfig(fp16="FP16" in settings.builder_flags, int8="INT8" in settings.builder_flags,
                            refittable="REFIT" in settings.builder_flags, profiles=[shapes],
                            memory_pool_limits=memory_pools(options),
                            builder_optimization_level=options.optimization_level,
                            load_timing_cache=str(timing_cache))
    if "REFIT_INDIVIDUAL" in settings.builder_flags:
        config = p.PostprocessConfig(config, refit_individual)
    return p.EngineBytesFromNetwork(network, config, save_timing_cache=str(timing_cache))


def pack_names(bundle_dir: Path, manifest: Manifest, graph: GraphSpec) -> list[str]:
    """Initializer names of the weight pack a refittable bucket-0 graph is refitted from."""
    from mordasr.runtime.weight_packs import load_weight_pack

    pack = manifest.weight_pack(graph.component, 0) if graph.bucket == 0 else None
    return list(load_weight_pack(bundle_dir, pack)) if pack else []


def build_engine(bundle_dir: Path, manifest: Manifest, graph: GraphSpec, options: EngineOptions,
                 timing_cache: Path) -> bytes:
    """The serialized engine of one graph, with mordasr's build decisions for this TensorRT."""
    version = tensorrt_version()
    settings = build_settings(version, graph.precision, graph_refittable(manifest, graph, options.refittable),
                              options.strongly_typed)
    profile = profile_shapes(manifest, graph, options.min_size, options.opt_size, options.max_size)
    names = pack_names(bundle_dir, manifest, graph) if settings.refit_only_packs else []
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    plan = engine_loader(bundle_dir / graph.file, settings, profile, options, timing_cache, names)()
    if not plan:
        raise MordasrError(f"TensorRT failed to build {graph.file} (see the log above)")
    return bytes(plan)
