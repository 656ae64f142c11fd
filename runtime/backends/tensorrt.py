"""TensorRT backend (TensorRT 10 and 11 runtime API; cuda-python for memory and streams; no torch).

Per graph: deserialize the engine named for this GPU and TensorRT version, bind I/O by the names
the manifest records, copy through pinned host buffers on one CUDA stream, run with
``execute_async_v3``, and replay a captured CUDA graph when the shapes repeat. Folded buckets are
reached either by an LRU of loaded engines (``max_engines``) or by refitting bucket 0's engine
from a weight pack, always with full tensors (base + the bucket's delta), never on top of the
bucket loaded before.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.lazy import lazy_import
from mordasr.runtime.engine_cache import EngineCache, EngineKey, build_hint, resolve_engine
from mordasr.runtime.engine_names import LRUCache, TensorRTVersion, engine_file_name, engine_mismatch
from mordasr.runtime.manifest import GraphSpec, Manifest, verify_file
from mordasr.runtime.trt_build import build_engine
from mordasr.runtime.trt_settings import EngineOptions, profile_shapes
from mordasr.runtime.weight_packs import BucketSlot, pack_loader, switch_bucket

if TYPE_CHECKING:  # mypy checks every call below against TensorRT's own API (tensorrt-stubs)
    import tensorrt as trt
else:
    trt = lazy_import("tensorrt", "the tensorrt backend")
cudart: Any = lazy_import("cuda.bindings.runtime", "the tensorrt backend")


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise MordasrError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


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
        self.device = _check(cudart.cudaMalloc(nbytes))
        self.host = _check(cudart.cudaMallocHost(nbytes))
        self.nbytes = nbytes

    def host_array(self, shape, dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.ctypeslib.as_array((ctypes.c_byte * count).from_address(self.host))
        return raw.view(dtype).reshape(shape)

    def free(self) -> None:
        if self.nbytes:
            cudart.cudaFree(self.device)
            cudart.cudaFreeHost(self.host)
        self.nbytes = 0


class CapturedGraph:
    """A CUDA graph captured from one launch, and its executable; both destroyed when replaced
    (a new input shape, a refit) and on close, so recaptures do not leak device memory."""

    def __init__(self) -> None:
        self.graph: Any = None
        self.exec: Any = None
        self.shapes: tuple | None = None

    def matches(self, shapes: tuple) -> bool:
        return self.exec is not None and self.shapes == shapes

    def set(self, graph: Any, graph_exec: Any, shapes: tuple) -> None:
        self.destroy()
        self.graph, self.exec, self.shapes = graph, graph_exec, shapes

    def destroy(self) -> None:
        if self.exec is not None:
            cudart.cudaGraphExecDestroy(self.exec)
        if self.graph is not None:
            cudart.cudaGraphDestroy(self.graph)
        self.graph, self.exec, self.shapes = None, None, None


class _LoadedEngine:
    def __init__(self, backend: "TensorRTBackend", file: str | Path) -> None:
        self.backend = backend
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

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        """Refit the engine with full tensors (``BucketWeights`` for ``switch_bucket``)."""
        refitter = trt.Refitter(self.engine, self.backend.logger)
        for name, value in tensors.items():
            if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value))):
                raise BundleError(f"engine has no refittable weight {name}: rebuild it with --refittable")
        missing = refitter.get_missing_weights()
        if missing:
            raise BundleError(f"refit needs {len(missing)} more weights (e.g. {missing[0]}); rebuild the engine")
        self.captured.destroy()  # a captured graph may hold pre-refit state
        if not refitter.refit_cuda_engine():
            raise BundleError("TensorRT refused the refit; rebuild the engine")

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str], use_cuda_graph: bool) -> dict:
        stream = self.backend.stream
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = tuple((n, feeds[n].shape) for n in self.names if self.is_input[n])
        for name, shape in shapes:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self.buffers[name]
            buf.ensure(array.nbytes)
            buf.host_array(array.shape, array.dtype)[...] = array
            if not self.context.set_input_shape(name, shape):
                raise BundleError(f"input {name} of shape {shape} is outside the engine's profile; "
                                  "rebuild with a larger --max-size or tile smaller")
            self.context.set_tensor_address(name, buf.device)
            _check(cudart.cudaMemcpyAsync(buf.device, buf.host, array.nbytes, kind_h2d, stream))
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
            _check(cudart.cudaGraphLaunch(self.captured.exec, stream))
        else:
            if not self.context.execute_async_v3(stream):
                raise MordasrError("TensorRT execution failed")
            if use_cuda_graph:
                self._capture(shapes)
        for name, (shape, dtype) in outputs.items():
            buf = self.buffers[name]
            _check(cudart.cudaMemcpyAsync(buf.host, buf.device, int(np.prod(shape)) * np.dtype(dtype).itemsize,
                                          kind_d2h, stream))
        _check(cudart.cudaStreamSynchronize(stream))
        return {n: self.buffers[n].host_array(*outputs[n]).copy() for n in output_names}

    def _capture(self, shapes: tuple) -> None:
        """Record this shape's launch as a CUDA graph (after one regular run has set TensorRT up)."""
        stream = self.backend.stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self.captured.destroy()
        graph = None
        try:
            _check(cudart.cudaStreamBeginCapture(stream, mode))
            self.context.execute_async_v3(stream)
            graph = _check(cudart.cudaStreamEndCapture(stream))
            self.captured.set(graph, _check(cudart.cudaGraphInstantiate(graph, 0)), shapes)
        except MordasrError:
            # Some engines (data-dependent shapes, some plugins) cannot be captured: run eagerly.
            if graph is not None:
                cudart.cudaGraphDestroy(graph)

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
        props = _check(cudart.cudaGetDeviceProperties(0))
        self.cc = f"{props.major}.{props.minor}"
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = _check(cudart.cudaStreamCreate())
        self.bucket_switch = bucket_switch
        self.cuda_graphs = cuda_graphs
        self.engines = LRUCache(max_engines, close=self._close_engine)
        self.slots: dict[str, BucketSlot] = {}  # refit mode: base graph key -> engine and its bucket
        self.cache = EngineCache(cache_dir)
        self.build_missing = build_missing

    def _close_engine(self, engine: _LoadedEngine) -> None:
        self.slots = {k: s for k, s in self.slots.items() if s.target is not engine}
        engine.close()

    def close(self) -> None:
        """Free every engine, captured graph and buffer, then the stream."""
        self.engines.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None

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

    def _engine_options(self) -> EngineOptions:
        sizes = {k: f"{hw[1]}x{hw[0]}" for k, hw in self.manifest.profile.items()}
        builder = self.manifest.device.get("builder", {})
        return EngineOptions(min_size=sizes["min"], opt_size=sizes["opt"], max_size=sizes["max"],
                             refittable=self.bucket_switch == "refit",
                             workspace_mb=builder.get("workspace_mb", 4096),
                             tactic_dram_mb=builder.get("tactic_dram_mb"),
                             optimization_level=builder.get("optimization_level", 3))

    def _cached_engine(self, graph: GraphSpec) -> Path:
        hint = build_hint(self.bundle_dir, graph.file)
        if not self.manifest.profile:
            raise BundleError(f"no TensorRT engine for {graph.key} on this device and the bundle records no "
                              f"shape profile to build one; build it with: {hint}")
        options = self._engine_options()
        profile = profile_shapes(self.manifest, graph, options.min_size, options.opt_size, options.max_size)
        key = EngineKey.make(graph.key, self.cc, str(self.version), graph.precision, profile,
                             self.manifest.content_hash(), options.refittable)
        timing = self.cache.timing_cache(self.cc, str(self.version))
        build = ((lambda: build_engine(self.bundle_dir, self.manifest, graph, options, timing))
                 if self.build_missing else None)
        return resolve_engine(self.cache, key, build, hint)

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bucket = graph.bucket
        if (self.bucket_switch != "refit" or bucket is None or graph.fallback
                or self.manifest.weight_pack(graph.component, bucket) is None):
            engine = self.engines.get(graph.key, lambda: _LoadedEngine(self, self.engine_file(graph)))
        else:
            base = self.manifest.graph(graph.component, 0)
            engine = self.engines.get(base.key, lambda: _LoadedEngine(self, self.engine_file(base)))
            slot = self.slots.get(base.key)
            if slot is None or slot.target is not engine:
                # a freshly loaded engine holds bucket 0's weights, as built
                slot = self.slots[base.key] = BucketSlot(engine, bucket=0)
            switch_bucket(slot, bucket, pack_loader(self.bundle_dir, self.manifest, graph.component))
        return engine.run(feeds, [o.name for o in graph.outputs], self.cuda_graphs)
