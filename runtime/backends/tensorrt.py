"""TensorRT backend (TensorRT 10 and 11 runtime API; cuda-python for memory and streams; no torch).

Per graph: deserialize the engine named for this GPU and TensorRT version, bind I/O by the names
the manifest records, copy through pinned host buffers on one CUDA stream, run with
``execute_async_v3``, and replay a captured CUDA graph when the shapes repeat. Folded buckets are
reached either by an LRU of loaded engines (``max_engines``) or by refitting bucket 0's engine
from a weight pack, always with full tensors (base + the bucket's delta), never on top of the
bucket loaded before.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime.engine_cache import EngineCache, EngineKey, resolve_engine, trtexec_hint
from mordasr.runtime.engine_names import LRUCache, TensorRTVersion, engine_file_name, engine_mismatch
from mordasr.runtime.manifest import GraphSpec, Manifest, verify_file
from mordasr.runtime.weight_packs import load_weight_pack



def _import():
    try:
        import tensorrt as trt
    except ImportError:
        raise MordasrError("the tensorrt backend needs TensorRT's Python package (JetPack ships it; "
                           "on desktops: pip install tensorrt)") from None
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MordasrError("the tensorrt backend needs cuda-python: pip install cuda-python") from None
    return trt, cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise MordasrError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


class _Buffer:
    """A device buffer and its pinned host mirror, grown on demand."""

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self.nbytes = 0
        self.device = 0
        self.host = 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        self.device = _check(self.cudart.cudaMalloc(nbytes))
        self.host = _check(self.cudart.cudaMallocHost(nbytes))
        self.nbytes = nbytes

    def host_array(self, shape, dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = (np.ctypeslib.as_array((np.ctypeslib.ctypes.c_byte * count).from_address(self.host)))
        return raw.view(dtype).reshape(shape)

    def free(self) -> None:
        if self.nbytes:
            self.cudart.cudaFree(self.device)
            self.cudart.cudaFreeHost(self.host)
        self.nbytes = 0


class _LoadedEngine:
    def __init__(self, backend: "TensorRTBackend", file: str) -> None:
        self.backend = backend
        trt = backend.trt
        data = Path(file).read_bytes()
        self.engine = backend.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {file}: it was built for another GPU or "
                              "TensorRT version, or is damaged (rebuild it with build_engines.sh)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}
        self.buffers = {n: _Buffer(backend.cudart) for n in self.names}
        self.graph_exec = None
        self.graph_shapes = None
        self.bucket: int | None = None  # refit mode: the bucket whose weights are in the engine

    def refit(self, tensors: dict[str, np.ndarray]) -> None:
        trt = self.backend.trt
        refitter = trt.Refitter(self.engine, self.backend.logger)
        for name, value in tensors.items():
            if not refitter.set_named_weights(name, trt.Weights(np.ascontiguousarray(value))):
                raise BundleError(f"engine has no refittable weight {name}: rebuild it with --refittable")
        missing = refitter.get_missing_weights()
        if missing:
            raise BundleError(f"refit needs {len(missing)} more weights (e.g. {missing[0]}); rebuild the engine")
        if not refitter.refit_cuda_engine():
            raise BundleError("TensorRT refused the refit; rebuild the engine")
        self.graph_exec = None  # a captured graph may hold pre-refit state

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str], use_cuda_graph: bool) -> dict:
        trt, cudart, stream = self.backend.trt, self.backend.cudart, self.backend.stream
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        shapes = tuple((n, feeds[n].shape) for n in self.names if self.is_input[n])
        for name, shape in shapes:
            array = np.ascontiguousarray(feeds[name], dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
            buf = self.buffers[name]
            buf.ensure(array.nbytes)
            buf.host_array(array.shape, array.dtype)[...] = array
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, buf.device)
            _check(cudart.cudaMemcpyAsync(buf.device, buf.host, array.nbytes, kind_h2d, stream))
        outputs = {}
        for name in self.names:
            if self.is_input[name]:
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = trt.nptype(self.engine.get_tensor_dtype(name))
            buf = self.buffers[name]
            buf.ensure(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.context.set_tensor_address(name, buf.device)
            outputs[name] = (shape, dtype)
        if use_cuda_graph and self.graph_exec is not None and self.graph_shapes == shapes:
            _check(cudart.cudaGraphLaunch(self.graph_exec, stream))
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

    def _capture(self, shapes) -> None:
        """Record this shape's launch as a CUDA graph (after one regular run has set TensorRT up)."""
        cudart, stream = self.backend.cudart, self.backend.stream
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        try:
            _check(cudart.cudaStreamBeginCapture(stream, mode))
            self.context.execute_async_v3(stream)
            graph = _check(cudart.cudaStreamEndCapture(stream))
            self.graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0))
            self.graph_shapes = shapes
        except MordasrError:
            # Some engines (data-dependent shapes, some plugins) cannot be captured: run eagerly.
            self.graph_exec, self.graph_shapes = None, None

    def close(self) -> None:
        for buf in self.buffers.values():
            buf.free()
        self.context = None
        self.engine = None


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: Manifest, bundle_dir: str | Path, max_engines: int = 8,
                 bucket_switch: str = "graphs", cuda_graphs: bool = True, cache_dir=None,
                 build_missing: bool = True) -> None:
        self.trt, self.cudart = _import()
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.version = TensorRTVersion.parse(self.trt.__version__)
        props = _check(self.cudart.cudaGetDeviceProperties(0))
        self.cc = f"{props.major}.{props.minor}"
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.bucket_switch = bucket_switch
        self.cuda_graphs = cuda_graphs
        self.engines = LRUCache(max_engines, close=lambda e: e.close())
        self.cache = EngineCache(cache_dir)
        self.build_missing = build_missing

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

    def _engine_options(self):
        from mordasr.export.engines import EngineOptions

        sizes = {k: f"{hw[1]}x{hw[0]}" for k, hw in self.manifest.profile.items()}
        builder = self.manifest.device.get("builder", {})
        return EngineOptions(**{f"{k}_size": v for k, v in sizes.items()},
                             refittable=self.bucket_switch == "refit",
                             workspace_mb=builder.get("workspace_mb", 4096),
                             tactic_dram_mb=builder.get("tactic_dram_mb"),
                             optimization_level=builder.get("optimization_level", 3))

    def _cached_engine(self, graph: GraphSpec) -> Path:
        hint = trtexec_hint(self.bundle_dir, graph.file)
        try:
            from mordasr.export.engines import build_engine
            from mordasr.export.tensorrt_config import profile_shapes
        except ImportError:  # the runtime-only install has no exporter
            build_engine = None
        if build_engine is None or not self.manifest.profile:
            raise BundleError(f"no TensorRT engine for {graph.key} on this device and this install cannot "
                              f"build one; build it with: {hint}")
        options = self._engine_options()
        profile = profile_shapes(self.manifest, graph, options.min_size, options.opt_size, options.max_size)
        key = EngineKey.make(graph.key, self.cc, str(self.version), graph.precision, profile,
                             self.manifest.content_hash(), options.refittable)
        timing = self.cache.timing_cache(self.cc, str(self.version))
        timing.parent.mkdir(parents=True, exist_ok=True)
        build = (lambda: build_engine(self.trt, self.bundle_dir, self.manifest, graph, options, self.version, timing)
                 if self.build_missing else None)
        return resolve_engine(self.cache, key, build, hint)

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pack = (self.manifest.weight_pack(graph.component, graph.bucket)
                if self.bucket_switch == "refit" and graph.bucket is not None and not graph.fallback else None)
        if pack is None:
            engine = self.engines.get(graph.key, lambda: _LoadedEngine(self, self.engine_file(graph)))
        else:
            base = self.manifest.graph(graph.component, 0)
            engine = self.engines.get(base.key, lambda: _LoadedEngine(self, self.engine_file(base)))
            if engine.bucket != graph.bucket:
                engine.refit(load_weight_pack(self.bundle_dir, pack))
                engine.bucket = graph.bucket
        return engine.run(feeds, [o.name for o in graph.outputs], self.cuda_graphs)
