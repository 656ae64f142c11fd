"""INT8 graphs with explicit QuantizeLinear/DequantizeLinear, calibrated with ONNX Runtime.

The Q/DQ form TensorRT 10 and 11 accept: int8, symmetric (zero point 0), per-channel weights on
the output-channel axis, per-tensor activations, biases left in float. Only Conv, MatMul and
Gemm are quantized; layers that quantize badly are kept in float by node-name pattern.
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


class _FeedReader(CalibrationDataReader):
    """ONNX Runtime's calibration reader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._iter = iter(list(feeds))

    def get_next(self):
        return next(self._iter, None)


def float_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> list[str]:
    patterns = tuple(patterns)
    return [n.name for n in model.graph.node if any(p in n.name for p in patterns)]


def quantize_int8(model_path: str | Path, out_path: str | Path, feeds: Sequence[dict[str, np.ndarray]],
                  *, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT, method: str = "minmax",
                  smoothquant: bool = False) -> onnx.ModelProto:
    """Quantize one graph from calibration feeds; returns the Q/DQ model written to ``out_path``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    if not feeds:
        raise ValueError("no calibration data for this graph")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
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
    op_types = ["Conv", "MatMul", "Gemm"]
    with tempfile.TemporaryDirectory(prefix="mordasr-calib.") as work:
        reader, cache = _FeedReader(feeds), None
        if method == "entropy":
            # quantize_static passes no histogram sizes to the entropy calibrator, whose defaults
            # (128 bins, 128 quantized bins) leave the KL search one candidate: the min/max range.
            cache = Path(work) / "ranges.json"
            save_tensors_data(_entropy_ranges(model_path, op_types, feeds, Path(work)), cache)
            reader = None
        quantize_static(str(model_path), str(out_path), reader,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes(model, keep_float),
                        calibrate_method=calibrate_method, extra_options=extra, calibration_cache_path=cache)
    return onnx.load(str(out_path))


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
