"""Inference backends behind one small protocol: ``Backend(manifest, bundle_dir)`` and
``run(graph, feeds) -> outputs``. Optional backends are imported only when chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mordasr.runtime.manifest import GraphSpec, Manifest

BACKENDS = ("onnxruntime",)


class Backend(Protocol):
    name: str

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def create_backend(name: str, manifest: Manifest, bundle_dir: str | Path, **options) -> Backend:
    if name == "onnxruntime":
        from mordasr.runtime.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, bundle_dir, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
