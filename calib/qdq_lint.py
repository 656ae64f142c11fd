"""Check that every Q/DQ pair is one TensorRT accepts: int8, symmetric (zero point 0), positive
finite scales, per-tensor activations and per-channel weights on the output-channel axis."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def _weight_axis(consumer: onnx.NodeProto, input_index: int) -> int | None:
    """Output-channel axis of a weight input, or None when the input is not a weight."""
    if consumer.op_type in ("Conv", "ConvTranspose") and input_index == 1:
        return 0 if consumer.op_type == "Conv" else 1
    if consumer.op_type == "MatMul" and input_index == 1:
        return 1  # B is (in, out)
    if consumer.op_type == "Gemm" and input_index == 1:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def lint_qdq(model: onnx.ModelProto) -> list[str]:
    """Violations as 'node: reason' lines; empty when the graph is TensorRT-clean."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: next(a.t for a in n.attribute if a.name == "value")
              for n in model.graph.node if n.op_type == "Constant" and n.attribute}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def value(name: str):
        tensor = inits.get(name) or consts.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        where = node.name or node.output[0]
        scale = value(node.input[1])
        if scale is None:
            problems.append(f"{where}: scale is not a constant")
            continue
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            problems.append(f"{where}: scale must be positive and finite")
        zero = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None:
            problems.append(f"{where}: zero point missing (defaults to uint8; TensorRT needs int8)")
        elif zero.dtype != np.int8:
            problems.append(f"{where}: zero point is {zero.dtype}, TensorRT needs int8")
        elif np.any(zero != 0):
            problems.append(f"{where}: zero point must be 0 (symmetric quantization)")
        if scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if node.op_type == "DequantizeLinear":
                for consumer, index in consumers.get(node.output[0], []):
                    want = _weight_axis(consumer, index)
                    if want is None:
                        problems.append(f"{where}: per-channel scale on an activation (feeds {consumer.op_type})")
                    elif axis != want:
                        problems.append(f"{where}: per-channel axis {axis}, the output-channel axis is {want}")
    return problems
