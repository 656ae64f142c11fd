"""FP16 graphs with ONNX Runtime's float16 converter, I/O types kept, sensitive ops kept in FP32.

(onnxruntime.transformers.float16 is the maintained copy of onnxconverter-common's converter;
the latter's 1.16 release produced invalid graphs for our encoder, where a Cast feeds a blocked
Sqrt in the attention scale.)

Normalisation statistics (GroupNorm exports as InstanceNormalization), LayerNorm, Softmax and
the sinusoidal time embedding overflow or lose too much in FP16, so they stay FP32 with Cast
nodes around them; everything else (Conv, MatMul, Gemm, elementwise) runs in FP16.

Gated and hybrid graphs also keep their routing in FP32: every node computed from the
degradation scores alone (router Gemm, softmax, top-k threshold, renormalisation), because
rounding the router logits can flip a near-tied top-k choice and switch a whole expert.
"""

from __future__ import annotations

import warnings

import onnx

FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
            "ReduceMean", "ReduceL2", "Pow", "Sqrt", "Exp", "Sin", "Cos", "Erf", "TopK", "Resize")


def routing_nodes(model: onnx.ModelProto, source: str = "scores") -> list[str]:
    """Names of the nodes whose outputs depend on ``source`` and on constants only."""
    if source not in {i.name for i in model.graph.input}:
        return []
    constant = {i.name for i in model.graph.initializer} | {""}
    derived = {source}
    names = []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        inputs = set(node.input)
        if inputs & derived and inputs <= derived | constant:
            derived.update(node.output)
            names.append(node.name)
        elif not node.input and node.op_type == "Constant":
            constant.update(node.output)
    return names


def convert_fp16(model: onnx.ModelProto, fp32_ops: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())
    # Stale value_info from the exporter's shape inference makes the converter type the outputs of
    # blocked nodes as float16 while it casts them from float32 (an invalid graph); drop it and
    # let the converter re-infer.
    model.graph.ClearField("value_info")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-constant "truncated to 1e-7" notices
        return convert_float_to_float16(model, keep_io_types=True,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(fp32_ops),
                                        node_block_list=routing_nodes(model))
