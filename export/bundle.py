"""Write a bundle: one ONNX graph per component (per bucket for folded) and ``manifest.json``.

The bundle is assembled in a temporary sibling folder and renamed into place at the end, so an
interrupted export never leaves a half-written bundle where the runtime would find it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from mordasr import __version__
from mordasr.errors import MordasrError
from mordasr.export.graphs import (
    DecoderGraph,
    EncoderGraph,
    RouterGraph,
    UNetGraph,
    component_specs,
    example_inputs,
    lr_multiple,
)
from mordasr.export.onnx_export import DEFAULT_OPSET, export_onnx, io_specs
from mordasr.graphs import EXTERNAL_DATA_THRESHOLD
from mordasr.graphs.lint import TENSORRT_MAJORS, check_bundle_graphs
from mordasr.graphs.packs import write_weight_packs
from mordasr.model import OneStepSR
from mordasr.model.inject import fold_adapters, fuse_adaptir, hybrid_adapters
from mordasr.runtime.atomic import atomic_directory
from mordasr.runtime.manifest import MODES, SCORE_FED_MODES, Bucket, GraphSpec, Manifest, TensorSpec, sha256_file
from mordasr.runtime.routing import BUCKET_RULE

log = logging.getLogger(__name__)


# Output sizes [h, w] in pixels the graphs are meant for (engine profiles; the runtime tiles
# images whose output would exceed "max"). The tiny UNet attends over its full-resolution latent
# (a 1024 px output needs 17 GB for one attention matrix), so its profile stops at 512.
DEFAULT_PROFILES = {"tiny": {"min": [128, 128], "opt": [256, 256], "max": [512, 512]},
                    "sd21": {"min": [256, 256], "opt": [512, 512], "max": [1024, 1024]}}


def default_profile(preset: str) -> dict[str, list[int]]:
    return {k: list(v) for k, v in DEFAULT_PROFILES.get(preset, DEFAULT_PROFILES["sd21"]).items()}

# Which export modes each adapter kind can be shipped in.
MODES_BY_ADAPTER = {"mor": ("folded", "gated", "hybrid"), "lora": ("dense-lora", "gated"),
                    "adaptir": ("adaptir",)}


def default_mode(adapter: str) -> str:
    return MODES_BY_ADAPTER[adapter][0]


def _graph_jobs(model: OneStepSR, mode: str, buckets: list[Bucket]):
    """(component, bucket, file name, module) for every graph of the bundle, in export order."""
    import torch

    yield "router", None, "router.onnx", RouterGraph(model)
    if mode == "folded":
        for b in buckets:
            folded = fold_adapters(model, torch.tensor(b.centre))
            yield "encoder", b.index, f"encoder.b{b.index}.onnx", EncoderGraph(folded, gated=False)
            yield "unet", b.index, f"unet.b{b.index}.onnx", UNetGraph(folded, gated=False)
    else:
        if mode == "gated":
            variant = model
        elif mode == "adaptir":  # no routing: the branches stay, fused (matmul DFT, BN and LIM folded)
            variant = fuse_adaptir(model)
        elif mode == "hybrid":
            variant = hybrid_adapters(model)
        else:  # dense-lora: every gate is 1, so any score vector folds the same weights
            variant = fold_adapters(model, torch.zeros(model.config.num_degradations))
        fed = mode in SCORE_FED_MODES
        yield "encoder", None, "encoder.onnx", EncoderGraph(variant, gated=fed)
        yield "unet", None, "unet.onnx", UNetGraph(variant, gated=fed)
    yield "decoder", None, "decoder.onnx", DecoderGraph(model)


def check_mode(adapter: str, mode: str) -> None:
    if mode not in MODES:
        raise MordasrError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    allowed = MODES_BY_ADAPTER.get(adapter, ())
    if mode not in allowed:
        if adapter == "adaptir":
            hint = "AdaptIR has no routing to fold or gate: use --mode adaptir"
        elif mode == "dense-lora":
            hint = "dense-lora is the baseline: export a checkpoint trained with --adapter lora"
        elif mode == "adaptir":
            hint = "export a checkpoint trained with --adapter adaptir"
        else:
            hint = "a dense LoRA has no routing to fold or gate per rank: use --mode dense-lora"
        raise MordasrError(f"a {adapter} checkpoint cannot be exported in {mode} mode "
                           f"(it allows {', '.join(allowed)}); {hint}")


def export_bundle(model: OneStepSR, out: str | Path, mode: str, buckets: list[Bucket], *,
                  opset: int = DEFAULT_OPSET, slim: bool = True, force: bool = False,
                  source: dict | None = None, random_weights: bool = False,
                  weight_packs: bool = True, profile: dict[str, list[int]] | None = None,
                  max_batch: int = 1, lint_tensorrt: tuple[int, ...] = TENSORRT_MAJORS,
                  external_threshold: int = EXTERNAL_DATA_THRESHOLD,
                  on_graph: Callable[[str], None] | None = None) -> Manifest:
    if not model.has_adapters:
        raise MordasrError("the model has no adapters: export an adapted checkpoint (mordasr-train)")
    check_mode(model.config.adapter.kind, mode)
    if not buckets:
        raise MordasrError("at least one bucket is needed")
    if max_batch < 1:
        raise MordasrError(f"max_batch must be at least 1, not {max_batch}")
    out = Path(out)
    if out.exists() and not force:
        raise MordasrError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    gated = mode in SCORE_FED_MODES
    specs = component_specs(model, gated)
    multiple = lr_multiple(model)
    trace_side = max(16, 2 * multiple)
    with atomic_directory(out) as tmp:
        graphs = []
        for component, bucket, file, module in _graph_jobs(model, mode, buckets):
            args = example_inputs(model, component, gated, lr_size=trace_side)
            onnx_model, data = export_onnx(module, args, specs[component], tmp / file, opset, slim,
                                           external_threshold)
            if on_graph:
                on_graph(file)
            inputs, outputs = io_specs(onnx_model)
            graphs.append(GraphSpec(component, bucket, file, sha256_file(tmp / file),
                                    [TensorSpec(**t) for t in inputs], [TensorSpec(**t) for t in outputs],
                                    external_data=data,
                                    external_sha256=sha256_file(tmp / data) if data else None))
        if lint_tensorrt:
            check_bundle_graphs(tmp, [g.file for g in graphs], lint_tensorrt)
        packs = write_weight_packs(tmp, graphs) if mode == "folded" and weight_packs else []
        cfg = model.config
        manifest = Manifest(
            preset=cfg.preset, adapter=cfg.adapter.kind, mode=mode, precision="fp32",
            scale=cfg.scale, lr_multiple=multiple, latent_downsample=cfg.latent_downsample,
            router_image_size=cfg.router_image_size,
            degradations=[{"name": n, "positive": p, "negative": q} for n, p, q in cfg.prompts],
            temperature=cfg.temperature,
            scheduler={"timestep": model.schedule.timestep,
                       "sqrt_alpha_prod": model.schedule.sqrt_alpha_prod,
                       "sqrt_one_minus_alpha_prod": model.schedule.sqrt_one_minus_alpha_prod,
                       "latent_scale": cfg.latent_scale},
            buckets=buckets, bucket_rule=BUCKET_RULE, graphs=graphs, weight_packs=packs,
            profile=dict(profile or default_profile(cfg.preset)), max_batch=max_batch,
            random_weights=random_weights,
            source=dict(source or {}, opset=opset, tensorrt_lint=list(lint_tensorrt)),
            mordasr_version=__version__)
        manifest.write(tmp)
    log.info("wrote %s bundle with %d graphs to %s", mode, len(graphs), out)
    return manifest
