"""Export one component to ONNX, clean it, and check it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from mordasr.export.graphs import ComponentSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                 onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                 onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ComponentSpec,
                path: str | Path, opset: int = DEFAULT_OPSET, slim: bool = True) -> onnx.ModelProto:
    """Trace ``module`` with ``args`` into ``path``; constant-fold, slim and check the graph."""
    path = Path(path)
    module = module.eval()
    input_names = [io.name for io in spec.inputs][: len(args)]
    output_names = [io.name for io in spec.outputs]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about traced Python
        # control flow that is constant for our fixed configs.
        warnings.simplefilter("ignore")
        # nn.MultiheadAttention's inference fast path (open_clip's vision tower) has no ONNX
        # symbolic; the regular path exports to plain MatMul/Softmax.
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    if slim:
        model = _slim(model)
    onnx.checker.check_model(model, full_check=True)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.save(model, str(path))
    return model


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        import onnxslim
    except ImportError:
        log.warning("onnxslim not installed: graphs are exported without slimming")
        return model
    return onnxslim.slim(model)


def io_specs(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Names, numpy dtypes and shapes (dim names for dynamic dims) of a graph's I/O."""

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_TO_NUMPY.get(t.elem_type, str(t.elem_type)),
                        "shape": dims})
        return out

    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return describe(inputs), describe(model.graph.output)
