"""ONNX Runtime backend: one InferenceSession per graph, created on first use."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime.manifest import GraphSpec, Manifest


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise MordasrError("onnxruntime is not installed: pip install onnxruntime "
                           "(or onnxruntime-gpu on CUDA hosts)") from None
    return onnxruntime


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, bundle_dir: str | Path,
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        self.ort = _import_ort()
        self.manifest = manifest
        self.bundle_dir = Path(bundle_dir)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def session(self, graph: GraphSpec):
        if graph.key not in self._sessions:
            options = self.ort.SessionOptions()
            options.log_severity_level = 3
            if self.threads:
                options.intra_op_num_threads = self.threads
            try:
                self._sessions[graph.key] = self.ort.InferenceSession(
                    str(self.bundle_dir / graph.file), options, providers=self.providers)
            except Exception as err:  # ORT raises its own exception types
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise BundleError(f"cannot load {graph.file}: {first}; re-export the bundle") from None
        return self._sessions[graph.key]

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(graph)
        names = [o.name for o in graph.outputs]
        values = session.run(names, feeds)
        return dict(zip(names, values))
