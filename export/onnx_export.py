"""Export one component to ONNX, clean it, and check it."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from mordasr.export.graphs import ComponentSpec
from mordasr.graphs import EXTERNAL_DATA_THRESHOLD
from mordasr.lazy import has_module

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                 onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
                 onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}


def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], spec: ComponentSpec,
                path: str | Path, opset: int = DEFAULT_OPSET, slim: bool = True,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> tuple[onnx.ModelProto, str | None]:
    """Trace ``module`` with ``args`` into ``path``; constant-fold, clean and check the graph.

    Graphs larger than ``external_threshold`` bytes keep their weights in ``<file>.data`` next
    to the graph (ONNX external data) and are cleaned with onnx-graphsurgeon on their structure
    alone; smaller ones are slimmed with onnxslim. Returns the graph (weights not loaded when external) and
    the external data file name, or None.
    """
    path = Path(path)
    module = module.eval()
    input_names = [io.name for io in spec.inputs][: len(args)]
    output_names = [io.name for io in spec.outputs]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tempfile.TemporaryDirectory(prefix=".trace.", dir=path.parent) as scratch:
        # The exporter writes one file per tensor for graphs past 2 GiB; trace into a scratch
        # folder so only the final graph (and at most one data file) lands in the bundle.
        traced = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter warns about its own deprecation and about traced Python
            # control flow that is constant for our fixed configs.
            warnings.simplefilter("ignore")
            # nn.MultiheadAttention's inference fast path (open_clip's vision tower) has no ONNX
            # symbolic; the regular path exports to plain MatMul/Softmax.
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset,
                                  input_names=input_names, output_names=output_names,
                                  dynamic_axes=spec.dynamic_axes(), do_constant_folding=True)
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        model = onnx.load(str(traced))
        weights = sum(len(i.raw_data) or i.ByteSize() for i in model.graph.initializer)
        if slim and weights <= external_threshold:
            model = _slim(model)
        if weights <= external_threshold:
            onnx.checker.check_model(model, full_check=True)
            model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
            onnx.save(model, str(path))
            return model, None
        data_name = path.name + ".data"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
    del model
    if slim:
        _clean_structure(path)
    # Checker and shape inference take the path for graphs whose weights live outside.
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
    return onnx.load(str(path), load_external_data=False), data_name


def _clean_structure(path: Path) -> None:
    """Dead nodes and unused tensors removed, nodes sorted, for a graph whose weights stay in its
    external data file (onnx-graphsurgeon on the structure alone).

    onnxslim cannot take these graphs: in memory it hits protobuf's 2 GB limit, and from the file
    it loads every weight (measured: killed at 24 GB on the sd21 UNet); its dead-node pass reads
    constant values, which a graph loaded without its data does not have.
    """
    if not has_module("onnx_graphsurgeon"):
        log.warning("%s: onnx-graphsurgeon not installed; the graph keeps the exporter's folding only", path.name)
        return
    import onnx_graphsurgeon as gs

    structure = onnx.load(str(path), load_external_data=False)
    graph = gs.import_onnx(structure)
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph)
    # external weights keep their file and offsets: only the structure is rewritten
    onnx.save(cleaned, str(path))
    log.info("%s: onnx-graphsurgeon cleanup, %d -> %d nodes", path.name, before, len(cleaned.graph.node))


def _slim(model: onnx.ModelProto) -> onnx.ModelProto:
    if not has_module("onnxslim"):
        log.warning("onnxslim not installed: graphs are exported without slimming")
        return model
    import onnxslim

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
