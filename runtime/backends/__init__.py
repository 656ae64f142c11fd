"""Inference backends behind one small protocol: ``Backend(manifest, bundle_dir)``,
``run(graph, feeds) -> outputs`` and ``close()``. Optional backends are imported only when chosen (polygraphy's
lazy-loader habit), so a CPU-only install never touches CUDA or TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mordasr.runtime.manifest import GraphSpec, Manifest

ORT_BACKENDS = ("onnxruntime", "ort-cuda", "ort-trt")
BACKENDS = ORT_BACKENDS + ("tensorrt",)


class Backend(Protocol):
    name: str
    # The smallest LR (height, width) its graphs take (a TensorRT engine's profile minimum; the
    # pipeline pads a smaller image up to it), or None: any size.
    min_input: tuple[int, int] | None

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Free every session, engine and buffer; the backend is not used again."""


def backend_options(backend: str, threads: int | None = None, bucket_switch: str | None = None,
                    max_engines: int | None = None) -> dict:
    """``Restorer`` backend options from the knobs every front end offers (unset ones follow the
    bundle's device profile)."""
    options: dict = {"bucket_switch": bucket_switch}
    if backend == "tensorrt":
        options["max_engines"] = max_engines
    elif threads:
        options["threads"] = threads
    return options


def create_backend(name: str, manifest: Manifest, bundle_dir: str | Path, **options) -> Backend:
    if name in ORT_BACKENDS:
        from mordasr.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, bundle_dir, backend=name, **options)
    if name == "tensorrt":
        from mordasr.runtime.backends.tensorrt import TensorRTBackend

        options.pop("threads", None)  # a CPU-thread knob means nothing to an engine
        return TensorRTBackend(manifest, bundle_dir, **options)
    if name == "triton-bls":  # inside a Triton Python-backend model only, so not in BACKENDS
        from mordasr.runtime.backends.triton import TritonBLSBackend

        options.pop("threads", None)
        return TritonBLSBackend(manifest, bundle_dir, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
