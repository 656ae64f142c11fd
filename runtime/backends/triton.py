"""Triton BLS backend: each graph runs as a model of the same Triton server.

Used only inside a Triton Python-backend model (``export/triton_pipeline.py``), where
``triton_python_backend_utils`` exists: the restorer's data path stays the one of
``runtime/pipeline.py`` while every graph call becomes a Business Logic Scripting request to the
component model that ``mordasr-export --triton`` wrote for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime.manifest import GraphSpec, Manifest


class TritonBLSBackend:
    name = "triton-bls"
    min_input = None  # the component models' engines are Triton's to size

    def __init__(self, manifest: Manifest, bundle_dir: str | Path, models: dict[str, str],
                 bucket_switch: str | None = None, pb_utils=None) -> None:
        if pb_utils is None:
            try:
                import triton_python_backend_utils as pb_utils
            except ImportError:
                raise MordasrError("the triton-bls backend runs only inside Triton's Python backend") from None
        self.pb = pb_utils
        self.manifest = manifest
        missing = [g.key for g in manifest.graphs if g.key not in models]
        if missing:
            raise BundleError(f"the Triton repository has no model for {', '.join(missing)}; "
                              "rewrite it with mordasr-export --triton")
        self.models = models  # GraphSpec.key -> Triton model name

    def close(self) -> None:
        """Nothing to free: the component models belong to the Triton server."""

    def run(self, graph: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pb = self.pb
        names = [o.name for o in graph.outputs]
        request = pb.InferenceRequest(
            model_name=self.models[graph.key], requested_output_names=names,
            inputs=[pb.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()],
            # outputs of GPU models come back in host memory, where the x0 step and tiling run
            preferred_memory=pb.PreferredMemory(pb.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():
            raise MordasrError(f"{self.models[graph.key]}: {response.error().message()}")
        return {name: pb.get_output_tensor_by_name(response, name).as_numpy() for name in names}
