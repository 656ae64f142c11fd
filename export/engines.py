"""Build TensorRT engines for a bundle, one per graph, and record them in its manifest.

Each engine is built by ``runtime/trt_build.py`` (Polygraphy's loaders), the same code the
runtime's engine cache builds with on a miss; every decision (flags, profiles, names, which
graphs) comes from ``runtime/trt_settings.py`` and is tested without TensorRT. Where TensorRT does
not import, ``engine_script.py`` writes the same builds as a script for the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mordasr.export.engine_script import SCRIPT_NAME
from mordasr.lazy import MissingDependency
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.cuda_runtime import device_capability
from mordasr.runtime.engine_names import engine_file_name
from mordasr.runtime.manifest import EngineSpec, load_manifest, sha256_file
from mordasr.runtime.trt_build import build_engine, tensorrt_version
from mordasr.runtime.trt_settings import EngineOptions, engine_graphs, graph_refittable, profile_shapes


def build_engines(bundle_dir: str | Path, options: EngineOptions,
                  on_engine: Callable[[str], None] | None = None) -> list[EngineSpec]:
    """Build an engine for each graph of the bundle and add them to its manifest."""
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    try:
        version = tensorrt_version()
    except MissingDependency as err:
        raise MissingDependency(f"{err}; or run {SCRIPT_NAME} on the device") from None
    cc = device_capability()
    timing_cache = bundle_dir / "engines" / f"timing.sm{cc.replace('.', '')}.trt{version}.cache"
    built = []
    for graph in engine_graphs(manifest, options.refittable):
        start = time.perf_counter()
        plan = build_engine(bundle_dir, manifest, graph, options, timing_cache)
        file = engine_file_name(graph, cc, version)
        atomic_write(bundle_dir / file, plan)
        built.append(EngineSpec(graph.key, file, sha256_file(bundle_dir / file), cc, str(version),
                                graph.precision,
                                profile_shapes(manifest, graph, options.min_size, options.opt_size,
                                               options.max_size),
                                graph_refittable(manifest, graph, options.refittable),
                                round(time.perf_counter() - start, 2)))
        if on_engine:
            on_engine(file)
    keep = [e for e in manifest.engines if e.file not in {b.file for b in built}]
    replace(manifest, engines=keep + built).write(bundle_dir)
    return built
