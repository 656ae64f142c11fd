"""FP16 graphs with ONNX Runtime's float16 converter, I/O types kept, sensitive ops kept in FP32.

(onnxruntime.transformers.float16 is the maintained copy of onnxconverter-common's converter;
the latter's 1.16 release produced invalid graphs for our encoder, where a Cast feeds a blocked
Sqrt in the attention scale.)

Normalisation statistics (GroupNorm exports as InstanceNormalization), LayerNorm, Softmax and
the sinusoidal time embedding overflow or lose too much in FP16, so they stay FP32 with Cast
nodes around them; everything else (Conv, MatMul, Gemm, elementwise) runs in FP16.

Gated and hybrid graphs also keep their routing in FP32: every node computed from the
degradation scores alone (router Gemm, softmax, top-k threshold, renormalisation), because
rounding can flip a near-tied top-k choice and switch a whole expert. The converter treats each
blocked node as an island and rounds every tensor between two of them through FP16 (a
Cast-to-FP16 + Cast-to-FP32 pair); those round trips are removed afterwards. Measured on the tiny
gated bundle: with them, softmax probabilities rounded onto the top-k threshold kept a third
expert and one held-out crop fell to 29.8 dB against FP32.
"""

from __future__ import annotations

import warnings

import onnx

from mordasr.graphs import EXTERNAL_DATA_THRESHOLD

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


def drop_fp16_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewire ``Cast(to=float)(Cast(to=float16)(t))`` to read the float32 ``t`` directly."""
    from onnx import TensorProto

    typed = onnx.shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type
                 for v in list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)}
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}

    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename = {}
    for node in model.graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in graph_outputs:
            continue
        inner = producer.get(node.input[0])
        if inner is None or cast_to(inner) != TensorProto.FLOAT16:
            continue
        if elem_type.get(inner.input[0]) == TensorProto.FLOAT:
            rename[node.output[0]] = inner.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in model.graph.node for i in n.input} | graph_outputs
    changed = True
    while changed:  # drop the casts nothing reads any more
        changed = False
        for node in list(model.graph.node):
            if node.op_type == "Cast" and not set(node.output) & used:
                model.graph.node.remove(node)
                changed = True
        used = {i for n in model.graph.node for i in n.input} | graph_outputs
    return model


def topological_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder nodes so each runs after its inputs' producers (the converter appends its casts at
    the end; ONNX requires, and TensorRT's parser walks, topological order). Kahn's algorithm,
    keeping the original order among ready nodes."""
    import heapq

    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name in producer:
                waiting[i] += 1
                consumers.setdefault(producer[name], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    del model.graph.node[:]
    model.graph.node.extend(nodes[i] for i in order)
    return model


def _infer_types_on_disk(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference for a graph too large to serialise in one piece: through a file with
    external data, as ``infer_shapes_path`` allows."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data")
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        return onnx.load(str(path))


def convert_fp16(model: onnx.ModelProto, fp32_ops: tuple[str, ...] = FP32_OPS) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # not SerializeToString: protobuf cannot serialise past 2 GB (sd21's UNet)
    model = copy
    # Stale value_info from the exporter's shape inference makes the converter type the outputs of
    # blocked nodes as float16 while it casts them from float32 (an invalid graph); drop it and
    # let the types be inferred afresh.
    model.graph.ClearField("value_info")
    large = sum(len(i.raw_data) for i in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if large:
        model = _infer_types_on_disk(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # per-constant "truncated to 1e-7" notices
        converted = convert_float_to_float16(model, keep_io_types=True,
                                             op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(fp32_ops),
                                             node_block_list=routing_nodes(model), disable_shape_infer=large)
    return topological_sort(drop_fp16_round_trips(converted))
