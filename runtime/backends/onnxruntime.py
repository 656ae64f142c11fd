"""ONNX Runtime backend: one InferenceSession per graph, created on first use.

Execution providers: CPU (``onnxruntime``), CUDA (``ort-cuda``) and TensorRT (``ort-trt``, with
its engine and timing caches on disk). With ``bucket_switch="refit"`` a folded bundle keeps one
encoder and one UNet session: switching bucket rebuilds that session from the bucket-0 graph with
the bucket's weight pack written over its initializers (full tensors, never deltas), the ONNX
Runtime counterpart of refitting one TensorRT engine instead of holding one per bucket.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from mordasr.errors import BundleError, MordasrError, first_line
from mordasr.lazy import import_optional
from mordasr.runtime.manifest import GraphSpec, Manifest
from mordasr.runtime.weight_packs import BucketSlot, pack_loader, switch_bucket

PROVIDERS = {
    "onnxruntime": ("CPUExecutionProvider",),
    "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}
BUCKET_SWITCHES = ("graphs", "refit")


def _import_ort():
    return import_optional("onnxruntime", "the onnxruntime backends")


@functools.cache
def shared_cpu_arena(ort) -> bool:
    """Register one CPU arena for every session of this process (once), growing by what is asked.

    A restore runs its graphs one after another, so one arena sized for the largest graph serves
    them all, where a session's own arena keeps that session's peak for the life of the session.
    Measured on the tiny folded bundle, six graphs at 512 px: 867 -> 249 MiB peak; the 1000x750
    photograph through the tiled restore: 776 -> 445 MiB, same speed. False where this onnxruntime
    cannot (each session then keeps its own arena).
    """
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
    except Exception:  # an onnxruntime without env allocators; ORT raises its own exception types
        return False
    return True


class _PackedSession:
    """ONNX Runtime's counterpart of a refittable engine: one session of the bucket-0 graph whose
    initializers are overridden with a bucket's pack (``write`` opens the session anew)."""

    def __init__(self, backend: "OnnxRuntimeBackend", base_graph: str) -> None:
        self.backend, self.base_graph = backend, base_graph
        self.session = None
        self.values: dict = {}

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        ort = self.backend.ort
        options = self.backend._options()
        # The ALL level's layout transforms pre-pack conv weights from the graph before the
        # overrides apply (measured: the bucket-0 weights win); EXTENDED keeps them.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # ORT reads initializers given in the options instead of the graph's own; the OrtValues
        # must outlive the session, so they are kept with it.
        values = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in tensors.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        self.session = None
        self.session = self.backend._open(self.base_graph, options)
        self.values = values


def provider_chain(backend: str, precision: str | tuple[str, ...], cache_dir: str | Path) -> list:
    """Providers with their options for a backend name, most preferred first.

    The TensorRT provider caches engines and timing data under ``cache_dir`` so a second run
    skips the build; FP16/INT8 are enabled to match the bundle's precision (its graphs already
    carry the FP16 types or Q/DQ nodes).
    """
    precisions = (precision,) if isinstance(precision, str) else tuple(precision)
    if backend not in PROVIDERS:
        raise MordasrError(f"unknown ONNX Runtime backend {backend!r}; choose one of {', '.join(PROVIDERS)}")
    chain: list = []
    for name in PROVIDERS[backend]:
        if name == "TensorrtExecutionProvider":
            cache = str(Path(cache_dir))
            chain.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                 "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                                 "trt_fp16_enable": "fp16" in precisions,
                                 "trt_int8_enable": "int8" in precisions}))
        else:
            chain.append(name)
    return chain


class OnnxRuntimeBackend:
    min_input = None  # ONNX Runtime takes any size

    def __init__(self, manifest: Manifest, bundle_dir: str | Path, backend: str = "onnxruntime",
                 threads: int | None = None, bucket_switch: str = "graphs",
                 cache_dir: str | Path | None = None) -> None:
        self.ort = _import_ort()
        self.name = backend
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.threads = threads
        if bucket_switch not in BUCKET_SWITCHES:
            raise MordasrError(f"unknown bucket switch {bucket_switch!r}; choose one of {', '.join(BUCKET_SWITCHES)}")
        if bucket_switch == "refit" and manifest.mode == "folded" and not manifest.weight_packs:
            raise BundleError("this folded bundle has no weight packs; re-export it without "
                              "--no-weight-packs to switch buckets by refit")
        if bucket_switch == "refit" and any(manifest.component_precision(p.component) == "int8"
                                            for p in manifest.weight_packs):
            # Measured: ONNX Runtime's initializer overrides do not reach Q/DQ weights (UNet
            # off by 0.13-0.19 at every optimization level, while the same pack written into the
            # graph is exact). Refuse rather than restore with the wrong weights.
            raise MordasrError("--bucket-switch refit is not supported for INT8 bundles on ONNX Runtime; "
                               "use --bucket-switch graphs")
        self.bucket_switch = bucket_switch
        self.providers = provider_chain(backend, tuple({g.precision for g in manifest.graphs}),
                                        cache_dir or self.bundle_dir / "ort-trt-cache")
        wanted = [p if isinstance(p, str) else p[0] for p in self.providers]
        available = set(self.ort.get_available_providers())
        if wanted[0] not in available:
            raise MordasrError(f"backend {backend} needs {wanted[0]}, which this onnxruntime lacks "
                               f"(it has {', '.join(sorted(available))}); install onnxruntime-gpu "
                               "built for this CUDA/TensorRT")
        self._sessions: dict[str, object] = {}
        self._slots: dict[str, BucketSlot] = {}  # refit mode: component -> its one session's bucket

    def _options(self):
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        # Graphs run one after another: a session's pool spinning after its run steals the cores
        # the next session needs (measured on the tiny gated bundle, 2 cores: end to end was 19.7 %
        # above the sum of the graphs' own times with spinning, -0.8 % without).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The memory pattern planner allocates one block for a run's recorded pattern from the
        # second run on, while the arena keeps the first run's chunks (onnxruntime PR #15005), so
        # every session holds its activations twice from its second tile. Measured on the tiny
        # folded bundle, 1000x750 -> 4000x3000 (12 tiles): peak RSS 1207 -> 770 MiB, time unchanged.
        options.enable_mem_pattern = False
        if shared_cpu_arena(self.ort):
            options.add_session_config_entry("session.use_env_allocators", "1")
        if self.threads:
            options.intra_op_num_threads = self.threads
        return options

    def _open(self, file: str, options, precision: str = "fp32"):
        try:
            source: str | bytes = str(self.bundle_dir / file)
            if precision == "int8" and self.providers == ["CPUExecutionProvider"]:
                from mordasr.runtime.qdq_cpu import cpu_graph

                source = cpu_graph(source)
            return self.ort.InferenceSession(source, options, providers=self.providers)
        except Exception as err:  # ORT raises its own exception types
            first = first_line(err)
            raise BundleError(f"cannot load {file}: {first}; re-export the bundle") from None

    def session(self, graph: GraphSpec):
        pack = (self.manifest.weight_pack(graph.component, graph.bucket)
                if self.bucket_switch == "refit" and graph.bucket is not None and not graph.fallback else None)
        if pack is None:
            if graph.key not in self._sessions:
                self._sessions[graph.key] = self._open(graph.file, self._options(), graph.precision)
            return self._sessions[graph.key]
        slot = self._slots.get(graph.component)
        if slot is None:
            slot = self._slots[graph.component] = BucketSlot(_PackedSession(self, pack.base_graph))
        switch_bucket(slot, pack.bucket, pack_loader(self.bundle_dir, self.manifest, graph.component))
        return slot.target.session

    def close(self) -> None:
        self._sessions.clear()
        self._slots.clear()

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in graph.outputs]
        values = session.run(names, feeds)
        return dict(zip(names, values))
