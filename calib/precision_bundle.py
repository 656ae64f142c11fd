"""Make an FP16, INT8 or mixed-precision bundle from an FP32 bundle.

The router stays FP32 (bucket choice must not move with precision); the encoder, UNet and
decoder graphs are converted, each to its own precision when a device profile or
``--component-precision`` says so (e.g. UNet INT8, decoder FP16). INT8 graphs are calibrated on
the inputs each graph sees when the FP32 bundle runs on calibration images, bucket by bucket for
folded bundles. Components named in ``fp32_fallback`` also keep their FP32 graph (``fp32/``), which
the runtime reruns when the reduced-precision output is not finite (FP16 VAEs overflow).
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from mordasr.calib.data import split_per_bucket
from mordasr.calib.fp16 import convert_fp16
from mordasr.calib.int8 import DEFAULT_KEEP_FLOAT, quantize_int8
from mordasr.calib.qdq_lint import lint_qdq
from mordasr.errors import BundleError, MordasrError
from mordasr.graphs.lint import check_bundle_graphs
from mordasr.graphs.packs import write_weight_packs
from mordasr.runtime.manifest import GraphSpec, Manifest, load_manifest, sha256_file
from mordasr.runtime.pipeline import Restorer
from mordasr.runtime.routing import nearest_bucket

log = logging.getLogger(__name__)

CONVERTED = ("encoder", "unet", "decoder")
FALLBACK_DIR = "fp32"
REDUCED = ("fp16", "int8")


def component_precisions(precision: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Precision per converted component: ``precision`` unless ``overrides`` names another."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(CONVERTED))
    if unknown:
        hint = " (the router always stays fp32)" if unknown == ["router"] else ""
        raise MordasrError(f"unknown component {unknown[0]!r} in the precision map; "
                           f"choose from {', '.join(CONVERTED)}{hint}")
    chosen = {c: overrides.get(c, precision) for c in CONVERTED}
    bad = [p for p in chosen.values() if p not in ("fp32",) + REDUCED]
    if bad:
        raise MordasrError(f"unknown precision {bad[0]!r}; choose fp32, fp16 or int8")
    return chosen


def parse_precision_map(text: str | None) -> dict[str, str]:
    """``"unet=int8,decoder=fp32"`` -> ``{"unet": "int8", "decoder": "fp32"}``."""
    from mordasr.runtime.cli_options import parse_pairs

    return parse_pairs(text, "--component-precision", form="COMPONENT=PRECISION")


def bundle_precision(precisions: dict[str, str]) -> str:
    used = set(precisions.values())
    return used.pop() if len(used) == 1 else "mixed"


def load_fp32_manifest(bundle: str | Path) -> Manifest:
    manifest = load_manifest(bundle)
    if manifest.precision != "fp32":
        raise BundleError(f"{bundle} is a {manifest.precision} bundle; calibrate from the fp32 bundle "
                          "that mordasr-export writes")
    return manifest


def collect_feeds(bundle: str | Path, images: list[np.ndarray], per_bucket: int):
    """Inputs each graph receives while the FP32 bundle restores the calibration images; a folded
    bundle restores each bucket's ``per_bucket`` nearest images through that bucket.

    Returns ({graph key: [feeds]}, {bucket: [image indices]}, {bucket: images the router sends it}).
    """
    feeds: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)

    def record(graph: GraphSpec, graph_feeds: dict, _output) -> None:
        feeds[graph.key].append({k: np.array(v, copy=True) for k, v in graph_feeds.items()})

    restorer = Restorer(bundle, tap=record)
    if restorer.manifest.mode == "folded":
        scores = np.stack([restorer.scores(im) for im in images])
        split = split_per_bucket(scores, restorer.centres, per_bucket)
        nearest = nearest_bucket(scores, restorer.centres)
        for bucket, indices in enumerate(split):
            for i in indices:
                restorer.restore(images[i], bucket=bucket)
        return (feeds, {b: idx for b, idx in enumerate(split)},
                {b: int((nearest == b).sum()) for b in range(len(split))})
    for image in images:
        restorer.restore(image)
    return feeds, {}, {}


def build_precision_bundle(src: str | Path, dst: str | Path, precision: str, *,
                           images: list[np.ndarray] | None = None, per_bucket: int = 16,
                           method: str = "minmax", smoothquant: bool = False,
                           keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT, source: str = "synthetic",
                           seed: int = 0, on_graph: Callable[[str], None] | None = None,
                           components: dict[str, str] | None = None,
                           fp32_fallback: Iterable[str] = (), ranges_dir: str | Path | None = None,
                           float_layers: dict[str, list[str]] | None = None) -> Manifest:
    """Write the ``precision`` version of the FP32 bundle ``src`` into the empty folder ``dst``.

    ``components`` overrides the precision per component; ``fp32_fallback`` names components whose
    FP32 graphs ship too, for the runtime's non-finite guard. INT8: each bucket's graphs calibrate
    on the ``per_bucket`` images nearest its centre (routed to it, or forced through it when too
    few are); ``ranges_dir`` keeps each graph's activation ranges (so the graph can be quantized
    again without calibrating); ``float_layers`` names, per graph key, nodes kept float.
    """
    src, dst = Path(src), Path(dst)
    manifest = load_fp32_manifest(src)
    if precision not in REDUCED:
        raise MordasrError(f"unknown precision {precision!r}; choose fp16 or int8")
    chosen = component_precisions(precision, components)
    fp32_fallback = tuple(fp32_fallback)
    unknown = [c for c in fp32_fallback if c not in CONVERTED]
    if unknown:
        raise MordasrError(f"cannot keep an FP32 fallback for {unknown[0]!r}; choose from {', '.join(CONVERTED)}")
    keep_float = tuple(keep_float)
    calibration: dict = {"precision": bundle_precision(chosen), "components": chosen,
                         "fp32_fallback": [c for c in fp32_fallback if chosen[c] != "fp32"]}
    feeds = {}
    if "int8" in chosen.values():
        if not images:
            raise MordasrError("INT8 needs calibration images (--calib-images must be at least 1)")
        feeds, split, routed = collect_feeds(src, images, per_bucket)
        calibration.update({"method": method, "smoothquant": smoothquant, "images": len(images),
                            "per_bucket": {str(b): idx for b, idx in split.items()},
                            "routed_per_bucket": {str(b): n for b, n in routed.items()},
                            "source": source, "seed": seed, "keep_float": list(keep_float)})
    if "fp16" in chosen.values():
        from mordasr.calib.fp16 import FP32_OPS

        calibration.update({"fp32_ops": list(FP32_OPS), "io_types": "kept"})
    graphs, fallbacks = [], []
    for g in manifest.graphs:
        target = chosen.get(g.component, "fp32")
        if target == "fp32":
            for file in filter(None, (g.file, g.external_data)):
                shutil.copy2(src / file, dst / file)
            graphs.append(g)
            continue
        if g.component in fp32_fallback:
            (dst / FALLBACK_DIR).mkdir(exist_ok=True)
            for file in filter(None, (g.file, g.external_data)):
                shutil.copy2(src / file, dst / FALLBACK_DIR / file)
            fallbacks.append(replace(g, file=f"{FALLBACK_DIR}/{g.file}", fallback=True,
                                     external_data=g.external_data and f"{FALLBACK_DIR}/{g.external_data}"))
        if target == "fp16":
            converted = convert_fp16(onnx.load(str(src / g.file)))
            onnx.checker.check_model(converted, full_check=True)
            onnx.save(converted, str(dst / g.file))
        else:
            ranges = Path(ranges_dir) / f"{g.key}.json" if ranges_dir is not None else None
            model = quantize_int8(src / g.file, dst / g.file, feeds.get(g.key, []), keep_float=keep_float,
                                  method=method, smoothquant=smoothquant, ranges=ranges,
                                  float_layers=(float_layers or {}).get(g.key, ()))
            problems = lint_qdq(model)
            if problems:
                raise MordasrError(f"{g.file}: Q/DQ lint failed ({len(problems)} problems), first: {problems[0]}")
        # Converted graphs are saved whole: FP16/INT8 halve (or quarter) the weights.
        graphs.append(replace(g, sha256=sha256_file(dst / g.file), precision=target,
                              external_data=None, external_sha256=None))
        if on_graph:
            on_graph(g.file)
    lint = tuple(manifest.source.get("tensorrt_lint", ()))
    if lint:
        check_bundle_graphs(dst, [g.file for g in graphs], lint)
    # Packs hold the converted tensors (FP16 weights; INT8 weights and per-bucket scales).
    packs = write_weight_packs(dst, graphs) if manifest.weight_packs else []
    new = replace(manifest, precision=bundle_precision(chosen), graphs=graphs + fallbacks, calibration=calibration,
                  weight_packs=packs, engines=[], source=dict(manifest.source, fp32_bundle=str(src)))
    new.write(dst)
    return new
