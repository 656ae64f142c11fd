"""TensorRT backend (TensorRT 10 and 11 runtime API; cuda-python for memory and streams; no torch).

Per graph: deserialize the engine named for this GPU and TensorRT version, bind I/O by the names
the manifest records, copy through pinned host buffers on one CUDA stream, run with
``execute_async_v3``, and replay a captured CUDA graph while the input shapes stay the same (one
graph per engine: a new shape, a refit or close destroys it and the next run recaptures).
Folded buckets are reached either by an LRU of loaded engines (``max_engines``) or by refitting
bucket 0's engine from a weight pack, always with full tensors (base + the bucket's delta), never
on top of the bucket loaded before; refit is chosen only for an engine built refittable whose
refittable weights hold the whole pack, else each bucket gets its own engine, with a warning.

The engines' profiles come from the manifest (``runtime/trt_settings.py``), and the pipeline never
sends more than they take: a smaller image is padded up to the profile's minimum (``min_input``),
a larger one is tiled, and a larger batch is split.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.lazy import lazy_import
from mordasr.runtime import cuda_runtime as cuda
from mordasr.runtime.engine_cache import EngineCache, EngineKey, build_hint, resolve_engine
from mordasr.runtime.engine_names import LRUCache, TensorRTVersion, engine_file_name, engine_mismatch
from mordasr.runtime.manifest import GraphSpec, Manifest, verify_file
from mordasr.runtime.trt_build import build_engine
from mordasr.runtime.trt_settings import (
    graph_refittable,
    min_input_size,
    profile_advice,
    profile_shapes,
    recorded_engine_options,
)
from mordasr.runtime.weight_packs import BucketSlot, load_weight_pack, pack_loader, switch_bucket

if TYPE_CHECKING:  # mypy checks every call below against TensorRT's own API (tensorrt-stubs)
    import tensorrt as trt
else:
    trt = lazy_import("tensorrt", "the tensorrt backend")

log = logging.getLogger("mordasr.runtime")


class _Buffer:
    """A device buffer and its pinned host mirror, grown on demand."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.device = 0
        self.host = 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        self.device = cuda.malloc(nbytes)
        self.host = cuda.malloc_host(nbytes)
        self.nbytes = nbytes

    def host_array(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.ctypeslib.as_array((ctypes.c_byte * count).from_address(self.host))
        return raw.view(dtype).reshape(shape)

    def free(self) -> None:
        if self.nbytes:
            cuda.free(self.device)
            cuda.free_host(self.host)
        self.nbytes = 0


class CapturedGraph:
    """A CUDA graph captured from one launch, and its executable; both destroyed when replaced
    (a new input shape, a refit) and on close, so recaptures do not leak device memory."""

    def __init__(self) -> None:
        self.graph: cuda.Graph | None = None
        self.exec: cuda.GraphExec | None = None
        self.shapes: tuple | None = None

    def matches(self, shapes: tuple) -> bool:
        return self.exec is not None and self.shapes == shapes

    def set(self, graph: cuda.Graph, graph_exec: cuda.GraphExec, shapes: tuple) -> None:
        self.destroy()
        self.graph, self.exec, self.shapes = graph, graph_exec, shapes

    def destroy(self) -> None:
        if self.exec is not None:
            cuda.graph_exec_destroy(self.exec)
        if self.graph is not None:
            cuda.graph_destroy(self.graph)
        self.graph, self.exec, self.shapes = None, None, None


class _LoadedEngine:
    def __init__(self, backend: "TensorRTBackend", key: str, file: str | Path) -> None:
        self.backend, self.key = backend, key
        data = Path(file).read_bytes()
        engine = backend.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT could not deserialize {file}: it was built for another GPU or "
                              "TensorRT version, or is damaged (rebuild it with build_engines.sh)")
        self.engine: trt.ICudaEngine = engine
        self.context: trt.IExecutionContext = engine.create_execution_context()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        self.buffers = {n: _Buffer() for n in self.names}
        self.captured = CapturedGraph()

    def refittable_weights(self) -> set[str]:
        """The names this engine can refit (empty when it was not built refittable)."""
        if not self.engine.refittable:
            return set()
        return set(trt.Refitter(self.engine, self.backend.logger).get_all_weights())

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        """Refit the engine with full tensors (``BucketWeights`` for ``switch_bucket``)."""
        if not self.engine.refittable:
            raise BundleError(f"{self.key}: the engine was not built refittable; rebuild it with --refittable")
        refitter = trt.Refitter(self.engine, self.backend.logger)
        for name, value in tensors.items():
            if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value))):
                raise BundleError(f"{self.key}: the engine has no refittable weight {name}; rebuild it "
                                  "with --refittable")
        missing = refitter.get_missing_weights()
        if missing:
            raise BundleError(f"{self.key}: refit needs {len(missing)} more weights (e.g. {missing[0]}); "
                              "rebuild the engine")
        self.captured.destroy()  # a captured graph may hold pre-refit state
        if not refitter.refit_cuda_engine():
            raise BundleError(f"{self.key}: TensorRT refused the refit; rebuild the engine")

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if self.context.set_input_shape(name, shape):
            return
        try:
            profile = [list(dims) for dims in self.engine.get_tensor_profile_shape(name, 0)]
        except Exception:  # an engine without a profile for this input
            profile = None
        raise BundleError(profile_advice(self.key, name, shape, profile, self.backend.manifest.max_batch))

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str], use_cuda_graph: bool) -> dict:
        stream = self.backend.stream
        shapes = tuple((n, feeds[n].shape) for n in self.names if self.is_input[n])
        for name, shape in shapes:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self.buffers[name]
            buf.ensure(array.nbytes)
            buf.host_array(array.shape, array.dtype)[...] = array
            self._set_shape(name, shape)
            self.context.set_tensor_address(name, buf.device)
            cuda.copy_to_device(buf.device, buf.host, array.nbytes, stream)
        outputs: dict[str, tuple[tuple[int, ...], Any]] = {}
        for name in self.names:
            if self.is_input[name]:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            buf = self.buffers[name]
            buf.ensure(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.context.set_tensor_address(name, buf.device)
            outputs[name] = (shape, dtype)
        if use_cuda_graph and self.captured.matches(shapes):
            cuda.graph_launch(self.captured.exec, stream)  # type: ignore[arg-type]  # matches() checked it
        else:
            if not self.context.execute_async_v3(stream):
                raise MordasrError(f"{self.key}: TensorRT execution failed")
            if use_cuda_graph:
                self._capture(shapes)
        for name, (shape, dtype) in outputs.items():
            buf = self.buffers[name]
            cuda.copy_to_host(buf.host, buf.device, int(np.prod(shape)) * np.dtype(dtype).itemsize, stream)
        cuda.stream_synchronize(stream)
        return {n: self.buffers[n].host_array(*outputs[n]).copy() for n in output_names}

    def _capture(self, shapes: tuple) -> None:
        """Record this shape's launch as a CUDA graph (after one regular run has set TensorRT up).
        A launch that fails while captured is not kept: the next run of this shape runs eagerly
        and tries again."""
        stream = self.backend.stream
        self.captured.destroy()
        try:
            cuda.begin_capture(stream)
        except MordasrError:
            return  # capture unavailable here: run eagerly
        enqueued = self.context.execute_async_v3(stream)
        try:
            graph = cuda.end_capture(stream)
        except MordasrError:
            return  # some engines (data-dependent shapes, some plugins) cannot be captured
        if not enqueued:
            cuda.graph_destroy(graph)
            raise MordasrError(f"{self.key}: TensorRT execution failed while capturing a CUDA graph")
        try:
            self.captured.set(graph, cuda.graph_instantiate(graph), shapes)
        except MordasrError:
            cuda.graph_destroy(graph)

    def close(self) -> None:
        self.captured.destroy()
        for buf in self.buffers.values():
            buf.free()
        del self.context
        del self.engine


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, bundle_dir: str | Path, max_engines: int = 8,
                 bucket_switch: str = "graphs", cuda_graphs: bool = True, cache_dir=None,
                 build_missing: bool = True) -> None:
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.version = TensorRTVersion.parse(trt.__version__)
        self.cc = cuda.device_capability()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream: cuda.Stream = cuda.stream_create()
        self.closed = False
        self.bucket_switch = bucket_switch
        self.cuda_graphs = cuda_graphs
        self.engines = LRUCache(max_engines, close=self._close_engine)
        self.slots: dict[str, BucketSlot] = {}  # refit mode: base graph key -> engine and its bucket
        self.refit_refused: set[str] = set()  # components whose engine cannot refit: one engine per bucket
        self.cache = EngineCache(cache_dir)
        self.build_missing = build_missing
        self.options = recorded_engine_options(manifest)
        self.min_input = min_input_size(manifest, self.options.min_size) if manifest.profile else None

    def _close_engine(self, engine: _LoadedEngine) -> None:
        self.slots = {k: s for k, s in self.slots.items() if s.target is not engine}
        engine.close()

    def close(self) -> None:
        """Free every engine, captured graph and buffer, then the stream."""
        self.engines.clear()
        if not self.closed:
            cuda.stream_destroy(self.stream)
            self.closed = True

    def engine_file(self, graph: GraphSpec) -> Path:
        """The bundle's engine for this GPU and TensorRT version; else the engine cache's, built on
        a miss (the cache key holds GPU, TensorRT version, precision, profile and bundle hash)."""
        file = engine_file_name(graph, self.cc, self.version)
        if (self.bundle_dir / file).is_file():
            recorded = next((e for e in self.manifest.engines if e.file == file), None)
            if recorded is not None:
                verify_file(self.bundle_dir, file, recorded.sha256)
            return self.bundle_dir / file
        stale = [why for e in self.manifest.engines if e.graph == graph.key
                 for why in [engine_mismatch(e.compute_capability, e.tensorrt_version, self.cc, str(self.version))]
                 if why]
        if stale and not self.build_missing:
            raise BundleError(f"{graph.key}: {stale[0]}")
        return self._cached_engine(graph)

    def _cached_engine(self, graph: GraphSpec) -> Path:
        hint = build_hint(self.bundle_dir, graph.file)
        if not self.manifest.profile:
            raise BundleError(f"no TensorRT engine for {graph.key} on this device and the bundle records no "
                              f"shape profile to build one; build it with: {hint}")
        options = self.options
        profile = profile_shapes(self.manifest, graph, options.min_size, options.opt_size, options.max_size)
        key = EngineKey.make(graph.key, self.cc, str(self.version), graph.precision, profile,
                             self.manifest.content_hash(), graph_refittable(self.manifest, graph, options.refittable))
        timing = self.cache.timing_cache(self.cc, str(self.version))
        build = ((lambda: build_engine(self.bundle_dir, self.manifest, graph, options, timing))
                 if self.build_missing else None)
        return resolve_engine(self.cache, key, build, hint)

    def _engine(self, graph: GraphSpec) -> _LoadedEngine:
        return self.engines.get(graph.key, lambda: _LoadedEngine(self, graph.key, self.engine_file(graph)))

    def _refitted(self, graph: GraphSpec, bucket: int) -> _LoadedEngine | None:
        """Bucket 0's engine of ``graph``'s component refitted to ``bucket``; None when that engine
        cannot refit the component's pack (then each bucket has its own engine)."""
        if graph.component in self.refit_refused:
            return None
        base = self.manifest.graph(graph.component, 0)
        engine = self._engine(base)
        slot = self.slots.get(base.key)
        if slot is None or slot.target is not engine:
            if not self._can_refit(base, engine, graph.component):
                return None
            # a freshly loaded engine holds bucket 0's weights, as built
            slot = self.slots[base.key] = BucketSlot(engine, bucket=0)
        switch_bucket(slot, bucket, pack_loader(self.bundle_dir, self.manifest, graph.component))
        return engine

    def _can_refit(self, base: GraphSpec, engine: _LoadedEngine, component: str) -> bool:
        """Whether ``engine`` can refit every tensor of ``component``'s weight packs (said once)."""
        pack = self.manifest.weight_pack(component, 0)
        names = set(load_weight_pack(self.bundle_dir, pack)) if pack else set()
        missing = names - engine.refittable_weights()
        if missing:
            why = ("was not built refittable" if not engine.engine.refittable
                   else f"cannot refit {len(missing)} of its weight-pack tensors (e.g. {sorted(missing)[0]})")
            log.warning("%s %s: switching %s buckets with one engine per bucket instead of refit "
                        "(re-export with --refittable, or a --device whose bucket switch is refit, to refit)",
                        base.key, why, component)
            self.refit_refused.add(component)
            return False
        return True

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        engine = None
        if (self.bucket_switch == "refit" and graph.bucket is not None and not graph.fallback
                and self.manifest.weight_pack(graph.component, graph.bucket) is not None):
            engine = self._refitted(graph, graph.bucket)
        if engine is None:
            engine = self._engine(graph)
        return engine.run(feeds, [o.name for o in graph.outputs], self.cuda_graphs)

