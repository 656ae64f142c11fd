"""Triton Python-backend model ``mordasr``: the whole MoR-DASR chain as one model.

``mordasr-export --triton`` copies this file as ``mordasr/1/model.py``. The chain is data
dependent (the router's scores pick a folded bucket; large images run in tiles; a non-finite
FP16 output reruns in FP32), which an ensemble's static graph cannot express, so it runs as
Business Logic Scripting: mordasr's own ``Restorer`` with the ``triton-bls`` backend, each graph
call a request to the component model written for it. Triton's Python environment needs
mordasr's torch-free runtime (``pip install 'mordasr[runtime]'``).

Inputs: ``image`` FP32 (H, W, 3) in [0, 1], the low-resolution RGB image. Outputs:
``restored`` FP32 (H*scale, W*scale, 3), ``scores`` FP32 (D,), ``bucket`` INT32 (1,) (-1 when
the bundle is not folded or tiles were routed on their own).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mordasr.runtime.jobs import each_or_error
from mordasr.runtime.pipeline import Restorer
from mordasr.runtime.tiling import Tiling


class TritonPythonModel:
    def initialize(self, args):
        here = Path(args["model_repository"]) / args["model_version"]
        pipeline = json.loads((here / "pipeline.json").read_text())
        self.restorer = Restorer(here, backend="triton-bls", verify_hashes=False, models=pipeline["models"],
                                 pb_utils=pb_utils)
        self.tiling = Tiling.from_dict(pipeline.get("tiling", {}))
        self.max_batch = max(1, pipeline.get("max_batch_size", 1))  # the component models' limit

    def execute(self, requests):
        images, answers = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
                    raise ValueError(f"image must be (H, W, 3) float32 in [0, 1], got shape {image.shape}")
                if not np.isfinite(image).all():
                    raise ValueError("image holds NaN or inf values")
                images.append((i, np.clip(image.astype(np.float32), 0.0, 1.0)))
            except Exception as err:
                answers[i] = _error(err)
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            results = each_or_error(lambda batch: self.restorer.restore_batch(batch, self.tiling),
                                    [image for _, image in chunk])
            for (i, _), result in zip(chunk, results):
                answers[i] = _error(result) if isinstance(result, Exception) else pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("restored", np.ascontiguousarray(result.image)),
                                    pb_utils.Tensor("scores", result.scores.astype(np.float32)),
                                    pb_utils.Tensor("bucket", np.array([-1 if result.bucket is None
                                                                         else result.bucket], np.int32))])
        return answers


def _error(err):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(err).__name__}: {err}"))
