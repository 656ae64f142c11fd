"""INT8 graphs in the form ONNX Runtime's CPU kernels fuse.

Bundles hold TensorRT's Q/DQ form: int8 activations with zero point 0. ONNX Runtime's x86 kernels
take uint8 activations (u8s8), and its QDQS8ToU8Transformer rewrites an int8 Q -> DQ pair to
uint8, but only where the Q feeds one DQ; its EnsureUniqueDQForNodeUnit has by then given every
consumer its own DQ. A Conv whose output feeds two nodes (the x and the sigmoid(x) of a SiLU)
keeps an int8 output beside a uint8 input, and ONNX Runtime leaves it a float Conv between
QuantizeLinear and DequantizeLinear nodes: slower than FP32. The same rewrite, done here before
ONNX Runtime sees the graph, reaches every activation pair: int8 with zero point z becomes uint8
with z + 128, which quantizes to the same values. Measured on the tiny demo bundle at 128² ->
512² (2 cores): QLinearConv nodes 6 -> 11 of 13 Convs in the encoder, 3 -> 7 of 9 in the
decoder, 32 -> 35 of 48 in the UNet.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mordasr.lazy import import_optional


def uint8_activations(model):
    """``model`` (an onnx.ModelProto, changed in place) with every int8 activation Q/DQ pair in uint8."""
    numpy_helper = import_optional("onnx.numpy_helper", "INT8 bundles on ONNX Runtime's CPU")
    initializers = {i.name: i for i in model.graph.initializer}
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    converted: dict[str, str] = {}
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        zero = initializers.get(q.input[2])
        dqs = consumers[q.output[0]]
        if zero is None or not dqs or any(d.op_type != "DequantizeLinear" or list(d.input[1:]) != list(q.input[1:])
                                          for d in dqs):
            continue
        value = numpy_helper.to_array(zero)
        if value.dtype != np.int8 or value.size != 1:
            continue
        name = converted.get(q.input[2])
        if name is None:
            name = converted[q.input[2]] = f"{q.input[2]}_uint8"
            shifted = (value.astype(np.int16) + 128).astype(np.uint8)
            model.graph.initializer.append(numpy_helper.from_array(shifted, name))
        for node in [q, *dqs]:
            node.input[2] = name
    return model


def cpu_graph(path: str | Path) -> bytes:
    """The serialized graph at ``path`` (external data read in), its activations in uint8."""
    onnx = import_optional("onnx", "INT8 bundles on ONNX Runtime's CPU")
    return uint8_activations(onnx.load(str(path))).SerializeToString()
