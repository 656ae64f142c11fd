"""INT8 graphs with explicit QuantizeLinear/DequantizeLinear, calibrated with ONNX Runtime.

The Q/DQ form TensorRT 10 and 11 accept: int8, symmetric (zero point 0), per-channel weights on
the output-channel axis, per-tensor activations, biases left in float. Conv, MatMul and Gemm are
quantized, and so is a SiLU (Sigmoid and Mul) right after a quantized Conv: with its input and
output quantized, ONNX Runtime runs the Conv, the Sigmoid and the Mul as QLinearConv,
QLinearSigmoid and QLinearMul without leaving int8 (measured on the tiny VAE at 128² -> 512²: its
encoder graph 205 -> 118 ms, decoder 211 -> 146 ms, against 164 and 194 ms in FP32), and
TensorRT fuses Conv + SiLU either way. Layers that quantize badly are kept in float by node-name
pattern or by name (``float_layers``, chosen by calib/mixed_precision.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from mordasr.errors import MordasrError

# Time embedding, first/last convs, conv shortcuts, output projections (norms are not
# quantized at all: only Conv/MatMul/Gemm are).
DEFAULT_KEEP_FLOAT = ("time_emb", "conv_in", "conv_out", "conv_shortcut", "to_out", "proj_out")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # the layers: weights and input activations in int8
ACTIVATION_OPS = ("Sigmoid", "Mul")  # a SiLU after a quantized Conv


class _FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._iter = iter(list(feeds))

    def get_next(self):
        return next(self._iter, None)


def float_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> list[str]:
    patterns = tuple(patterns)
    return [n.name for n in model.graph.node if any(p in n.name for p in patterns)]


def silu_after(model: onnx.ModelProto, convs: Iterable[str]) -> list[str]:
    """The Sigmoid and Mul nodes of every SiLU (x * sigmoid(x)) whose x is the output of one of
    the Conv nodes ``convs``."""
    convs = set(convs)
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.name in convs}
    sigmoids = {n.output[0]: n for n in model.graph.node if n.op_type == "Sigmoid" and n.input[0] in conv_outputs}
    found = []
    for node in model.graph.node:
        if node.op_type != "Mul":
            continue
        for x, gate in (node.input, node.input[::-1]):
            if gate in sigmoids and sigmoids[gate].input[0] == x:
                found += [sigmoids[gate].name, node.name]
                break
    return found


def int8_nodes(model: onnx.ModelProto, keep_float: Iterable[str], float_layers: Iterable[str] = (),
               only: Iterable[str] | None = None) -> list[str]:
    """The nodes a graph quantizes: its Conv/MatMul/Gemm layers (or just ``only``), less those
    ``keep_float``'s patterns or ``float_layers`` name, and the SiLUs after its quantized Convs."""
    excluded = set(float_nodes(model, keep_float)) | set(float_layers)
    wanted = set(only) if only is not None else None
    layers = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.name not in excluded
              and (wanted is None or n.name in wanted)]
    return layers + silu_after(model, layers)


def quantize_int8(model_path: str | Path, out_path: str | Path, feeds: Sequence[dict[str, np.ndarray]],
                  *, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT, method: str = "minmax",
                  smoothquant: bool = False, ranges: str | Path | None = None,
                  float_layers: Iterable[str] = (), only: Iterable[str] | None = None) -> onnx.ModelProto:
    """Quantize one graph from calibration feeds; returns the Q/DQ model written to ``out_path``.

    ``ranges``: a file for the activation ranges: computed from ``feeds`` and saved there when it does
    not exist, read (no calibration run) when it does, so a graph can be quantized again with other
    layers kept float at the cost of the rewrite alone. ``float_layers``: node names kept float
    beside those ``keep_float``'s patterns name; ``only``: quantize just these nodes.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
    cached = ranges is not None and Path(ranges).is_file()
    if not feeds and not cached:
        raise ValueError("no calibration data for this graph")
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[method]
    model = onnx.load(str(model_path))
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "CalibTensorRangeSymmetric": True,
    }
    if smoothquant:
        import importlib.util

        if importlib.util.find_spec("neural_compressor") is None:
            # ONNX Runtime's SmoothQuant pass lives in Intel Neural Compressor.
            raise MordasrError("--smoothquant needs neural-compressor: pip install neural-compressor")
        extra.update({"SmoothQuant": True, "SmoothQuantAlpha": 0.5})
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    with tempfile.TemporaryDirectory(prefix="mordasr-calib.") as work:
        cache = Path(ranges) if ranges is not None else Path(work) / "ranges.json"
        reader = None if cached else _FeedReader(feeds)
        if method == "entropy" and not cached:
            # quantize_static passes no histogram sizes to the entropy calibrator, whose defaults
            # (128 bins, 128 quantized bins) leave the KL search one candidate: the min/max range.
            save_tensors_data(_entropy_ranges(model_path, list(QUANTIZED_OPS + ACTIVATION_OPS), feeds, Path(work)),
                              cache)
            reader = None
        quantize_static(str(model_path), str(out_path), reader,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS + ACTIVATION_OPS),
                        per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        nodes_to_quantize=int8_nodes(model, keep_float, float_layers, only),
                        calibrate_method=calibrate_method, extra_options=extra, calibration_cache_path=cache)
    return onnx.load(str(out_path))


def quantized_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes a Q/DQ graph runs in INT8: those whose weight input comes through a
    DequantizeLinear of an int8 initializer."""
    produced = {out: n for n in model.graph.node for out in n.output}
    layers = []
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS and len(node.input) > 1:
            source = produced.get(node.input[1])
            if source is not None and source.op_type == "DequantizeLinear":
                layers.append(node.name)
    return layers


def _entropy_ranges(model_path: str | Path, op_types: list[str], feeds: Sequence[dict[str, np.ndarray]],
                    work: Path):
    """Symmetric KL-divergence (entropy) ranges of every calibrated tensor: 512 histogram bins, so
    the search may clip a range down to a quarter (slow: ONNX Runtime searches in Python)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(Path(model_path), op_types, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"symmetric": True, "num_bins": 512, "num_quantized_bins": 128})
    calibrator.collect_data(_FeedReader(feeds))
    return calibrator.compute_data()
