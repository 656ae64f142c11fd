"""Automatic mixed precision: the layers INT8 breaks, kept in float until the accuracy gate holds.

For each bucket that fails the gate, every INT8 layer of the bucket's graphs is measured on its
own: the FP32 graph with just that layer quantized (from the activation ranges already
calibrated, so no calibration runs again) restores the evaluation images' inputs, and its output's
error relative to the FP32 output is the layer's sensitivity (ModelOpt's AutoQuantize scores
layers the same way, for the whole model; here it is done per bucket, since folded buckets hold
different weights). The most sensitive layers are then kept float, 1, 2, 4, ... of them, until
every bucket passes. With weight packs, the layers kept float are the union over buckets for each
component, so every bucket's graph keeps one structure and one refittable engine still serves
them all.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from mordasr.calib.int8 import quantize_int8, quantized_layers
from mordasr.runtime.manifest import GraphSpec, load_manifest

log = logging.getLogger(__name__)


def bucket_feeds(fp32_bundle: Path, images: list[np.ndarray], bucket: int | None) -> dict[str, list[dict]]:
    """{graph key: [input feeds]} the FP32 bundle's graphs receive restoring ``images`` through ``bucket``."""
    from mordasr.runtime.pipeline import Restorer

    feeds: dict[str, list[dict]] = defaultdict(list)

    def record(graph: GraphSpec, graph_feeds: dict, _output) -> None:
        feeds[graph.key].append({k: np.array(v, copy=True) for k, v in graph_feeds.items()})

    with Restorer(fp32_bundle, tap=record) as restorer:
        for image in images:
            restorer.restore(image, bucket=bucket)
    return feeds


def _run(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def layer_sensitivity(fp32_graph: Path, int8_graph: Path, ranges: Path, feeds: list[dict], *,
                      method: str, keep_float: tuple[str, ...]) -> dict[str, float]:
    """{layer: error of the graph's output with only that layer in INT8, relative to the FP32
    output's power} for every layer ``int8_graph`` quantizes."""
    reference = _run(fp32_graph, feeds)
    power = float(np.mean([np.mean(r.astype(np.float64) ** 2) for r in reference])) or 1.0
    layers = quantized_layers(onnx.load(str(int8_graph)))
    found = {}
    with tempfile.TemporaryDirectory(prefix="mordasr-sensitivity.") as work:
        for layer in layers:
            single = Path(work) / "single.onnx"
            quantize_int8(fp32_graph, single, [], keep_float=keep_float, method=method, ranges=ranges, only=[layer])
            outputs = _run(single, feeds)
            found[layer] = float(np.mean([np.mean((o.astype(np.float64) - r) ** 2)
                                          for o, r in zip(outputs, reference)])) / power
    return found


def latency_ratio(slow: Path, fast: Path, feeds: list[dict], rounds: int = 9) -> float:
    """Median time of ``slow`` over median time of ``fast`` on the same feed, both run as the
    runtime runs INT8 graphs on the CPU (runtime/qdq_cpu.py), alternately so that other load on
    the machine hits both alike."""
    import onnxruntime as ort

    from mordasr.runtime.qdq_cpu import cpu_graph

    sessions = [ort.InferenceSession(cpu_graph(path), providers=["CPUExecutionProvider"]) for path in (slow, fast)]
    times: list[list[float]] = [[], []]
    for session in sessions:
        session.run(None, feeds[0])
    for _ in range(rounds):
        for session, found in zip(sessions, times):
            start = time.perf_counter()
            session.run(None, feeds[0])
            found.append(time.perf_counter() - start)
    return float(np.median(times[0]) / np.median(times[1]))


def plan_float_layers(ranked: dict[str, list[str]], count: int, components: dict[str, str],
                      union_per_component: bool) -> dict[str, list[str]]:
    """{graph key: the ``count`` most sensitive layers of each failing graph}; with
    ``union_per_component`` every graph of a component (``components``: graph key -> component)
    keeps the union of its component's layers."""
    chosen = {key: layers[:count] for key, layers in ranked.items()}
    if not union_per_component:
        return chosen
    per_component: dict[str, list[str]] = defaultdict(list)
    for key, layers in chosen.items():
        per_component[components[key]] += [name for name in layers if name not in per_component[components[key]]]
    return {key: list(per_component[component]) for key, component in components.items()
            if per_component.get(component)}


def rank_failing_buckets(fp32_bundle: Path, int8_bundle: Path, ranges_dir: Path, failing: list[int | None],
                         images: list[np.ndarray], *, method: str, keep_float: tuple[str, ...],
                         on_layer: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """({graph key: layers, most sensitive first}, {graph key: {layer: sensitivity}}) for the
    INT8 graphs of the failing buckets."""
    manifest = load_manifest(int8_bundle)
    ranked, scores = {}, {}
    for bucket in failing:
        feeds = bucket_feeds(fp32_bundle, images, bucket)
        for graph in manifest.primary_graphs:
            if graph.precision != "int8" or graph.key in ranked or graph.bucket not in (None, bucket):
                continue
            found = layer_sensitivity(fp32_bundle / graph.file, int8_bundle / graph.file,
                                      ranges_dir / f"{graph.key}.json", feeds[graph.key], method=method,
                                      keep_float=keep_float)
            scores[graph.key] = found
            ranked[graph.key] = sorted(found, key=found.get, reverse=True)
            if on_layer:
                on_layer(graph.key)
            log.info("%s: most sensitive layers %s", graph.key, ranked[graph.key][:3])
    return ranked, scores
