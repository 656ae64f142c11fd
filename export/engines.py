"""Build TensorRT engines for a bundle, one per graph, and record them in its manifest.

``tensorrt`` is imported only here and only when engines are built; every decision (flags,
profiles, names, which graphs) comes from ``tensorrt_config`` and is tested without it. Where
TensorRT does not import, ``trtexec_script`` writes the same builds as ``trtexec`` lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mordasr.errors import MordasrError
from mordasr.export.tensorrt_config import build_settings, profile_shapes
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.engine_names import TensorRTVersion, engine_file_name
from mordasr.runtime.manifest import EngineSpec, GraphSpec, Manifest, load_manifest, sha256_file


DEFAULT_WORKSPACE_MB = 4096
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level


class TensorRTUnavailable(MordasrError):
    """``tensorrt`` does not import here."""


@dataclass
class EngineOptions:
    min_size: str = "256"
    opt_size: str = "512"
    max_size: str = "1024"
    batch: tuple[int, int, int] = (1, 1, 1)
    refittable: bool = False
    strongly_typed: bool | None = None
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    optimization_level: int = DEFAULT_OPT_LEVEL
    tactic_dram_mb: int | None = None  # cap on builder tactic memory (unified memory on Jetson)


def engine_graphs(manifest: Manifest, refittable: bool) -> list[GraphSpec]:
    """Graphs that get an engine. A refittable folded bundle with weight packs builds bucket 0's
    encoder and UNet only: the other buckets are reached by refitting those engines."""
    graphs = []
    for g in manifest.graphs:
        if (refittable and not g.fallback and g.bucket not in (None, 0)
                and manifest.weight_pack(g.component, g.bucket) is not None):
            continue
        graphs.append(g)
    return graphs


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("tensorrt is not installed here; run the build_engines.sh that "
                                  "mordasr-export wrote on the target device") from None
    return tensorrt


def _device_compute_capability() -> str:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MordasrError("building engines needs cuda-python to read the GPU's compute "
                               "capability: pip install cuda-python") from None
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise MordasrError(f"no CUDA device: {err}")
    return f"{props.major}.{props.minor}"


def _pack_names(bundle_dir: Path, manifest: Manifest, graph: GraphSpec) -> list[str]:
    from mordasr.runtime.weight_packs import load_weight_pack

    pack = manifest.weight_pack(graph.component, 0) if graph.bucket == 0 else None
    return list(load_weight_pack(bundle_dir, pack)) if pack else []


def build_engine(trt, bundle_dir: Path, manifest: Manifest, graph: GraphSpec, options: EngineOptions,
                 version: TensorRTVersion, timing_cache_path: Path) -> bytes:
    settings = build_settings(version, graph.precision, options.refittable, options.strongly_typed)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in settings.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files next to the graph.
    if not parser.parse_from_file(str(bundle_dir / graph.file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise MordasrError(f"TensorRT cannot parse {graph.file}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.tactic_dram_mb:
        # On a Jetson the builder's tactic memory comes out of the same RAM the OS runs in: an
        # uncapped build runs out of memory for an engine that would fit (NVIDIA/TensorRT#3355).
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, options.tactic_dram_mb << 20)
    config.builder_optimization_level = options.optimization_level
    for name in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if settings.refit_only_packs:
        for name in _pack_names(bundle_dir, manifest, graph):
            network.set_weights_refittable(name, True)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(manifest, graph, options.min_size, options.opt_size,
                                              options.max_size, options.batch).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise MordasrError(f"TensorRT failed to build {graph.file} (see the log above)")
    atomic_write(timing_cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_engines(bundle_dir: str | Path, options: EngineOptions,
                  on_engine: Callable[[str], None] | None = None) -> list[EngineSpec]:
    """Build an engine for each graph of the bundle and add them to its manifest."""
    trt = import_tensorrt()
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    version = TensorRTVersion.parse(trt.__version__)
    cc = _device_compute_capability()
    timing_cache = bundle_dir / "engines" / f"timing.sm{cc.replace('.', '')}.trt{version}.cache"
    built = []
    for graph in engine_graphs(manifest, options.refittable):
        start = time.perf_counter()
        plan = build_engine(trt, bundle_dir, manifest, graph, options, version, timing_cache)
        file = engine_file_name(graph, cc, version)
        atomic_write(bundle_dir / file, plan)
        built.append(EngineSpec(graph.key, file, sha256_file(bundle_dir / file), cc, str(version),
                                graph.precision,
                                profile_shapes(manifest, graph, options.min_size, options.opt_size,
                                               options.max_size, options.batch),
                                options.refittable, round(time.perf_counter() - start, 2)))
        if on_engine:
            on_engine(file)
    keep = [e for e in manifest.engines if e.file not in {b.file for b in built}]
    replace(manifest, engines=keep + built).write(bundle_dir)
    return built
