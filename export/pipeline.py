"""What ``mordasr-export`` does, as a function a test can call (``run_export``).

1. Plan: the device profile, the preset's defaults and the options give sizes, precisions, modes
   and builder caps (``export/device_plan.py``).
2. For each candidate mode in turn: buckets, the FP32 bundle (``export/bundle.py``), and, when a
   reduced precision is asked for, its calibrated bundle (``calib/calibrate.py``), until the
   bundle's memory estimate fits the device.
3. The manifests are completed (device record, memory estimate, the engine options the runtime's
   engine cache must build with), and ``build_engines.sh`` / ``verify_engines.sh`` are written.
4. Optionally: TensorRT engines (where ``tensorrt`` imports) and a Triton model repository.

Everything is written in a hidden staging folder beside OUT and renamed into place only when
finished, manifests final: a failure or a refusal leaves nothing at OUT, and a reader never sees a
bundle whose manifest is still to be rewritten.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mordasr.calib.gate import DEFAULT_MAX_HR_LOSS, DEFAULT_MIN_PSNR
from mordasr.errors import MordasrError
from mordasr.export.device_plan import ExportPlan
from mordasr.export.memory import MemoryEstimate
from mordasr.runtime.manifest import EngineSpec

Note = Callable[[str], None]  # a line for the user (e.g. "note: ... clamped")
OnGraph = Callable[[str, str, int], None]  # (mode, graph file, graphs in the mode) after each graph


@dataclass
class ExportRequest:
    checkpoint: Path
    out: Path
    mode: str | None = None  # None: the device's or the adapter's default
    buckets: int = 4
    bucket_placement: str = "kmeans"
    calib_samples: int = 256
    weight_packs: bool = True
    device: str | None = None  # a device profile name or file
    sizes: dict[str, str | None] = field(default_factory=dict)  # min/opt/max output sizes, "N" or "WxH"
    component_precision: dict[str, str] | None = None
    fp32_fallback: tuple[str, ...] = ()
    precision: str | None = None  # fp16 / int8: OUT gets it, OUT-fp32 the FP32 bundle
    min_psnr: float = DEFAULT_MIN_PSNR  # the accuracy gate of --fp16 / --int8 (calib/gate.py)
    max_hr_loss: float = DEFAULT_MAX_HR_LOSS
    refittable: bool = False
    max_batch: int | None = None
    workspace_mb: int | None = None
    optimization_level: int | None = None
    strongly_typed: bool = False
    build_engines: bool = False
    triton_dir: Path | None = None
    opset: int = 17
    slim: bool = True
    seed: int = 0
    force: bool = False
    quiet: bool = False


@dataclass
class ExportResult:
    out: Path  # the headline bundle (the reduced-precision one when asked for)
    fp32_out: Path
    plan: ExportPlan
    estimate: MemoryEstimate
    bucket_switch: str
    engines: list[tuple[Path, EngineSpec]] = field(default_factory=list)
    triton_models: list[str] | None = None


def fp32_path(out: Path, precision: str | None) -> Path:
    return out.with_name(out.name + "-fp32") if precision else out


def run_export(request: ExportRequest, note: Note = lambda _: None,
               on_graph: OnGraph | None = None) -> ExportResult:
    """Export ``request.checkpoint`` to ``request.out`` (see the module docstring)."""
    out = Path(request.out)
    model, meta, plan, options = _plan(request, note)
    fp32_out = fp32_path(out, plan.headline_precision)
    staging = out.parent / f".{out.name}.export-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    engine_error = None
    try:
        result = _export_staged(request, model, meta, plan, options, staging, note, on_graph)
        if request.build_engines:
            try:
                result.engines = _build_engines(staging, result)
            except MordasrError as err:  # no TensorRT here: the bundles are complete without engines
                engine_error = err
        for final in {out, fp32_out}:  # every manifest is final: rename the bundles into place
            if final.exists():
                shutil.rmtree(final)
            (staging / final.name).rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if engine_error is not None:
        raise engine_error
    if request.triton_dir is not None:
        result.triton_models = _write_triton(out, request.triton_dir, request.build_engines, note)
    return result


def _plan(request: ExportRequest, note: Note):
    """(model, meta, plan, engine options) for the request; every refusal before anything is written."""
    from mordasr.export.bundle import MODES_BY_ADAPTER, check_mode, default_profile
    from mordasr.export.device_plan import make_plan
    from mordasr.model.io import load_checkpoint
    from mordasr.runtime.devices import load_device_profile
    from mordasr.runtime.trt_settings import EngineOptions, parse_size

    if request.triton_dir is not None and request.triton_dir.exists() and not request.force:
        raise MordasrError(f"{request.triton_dir} already exists (pass --force to replace it)")
    profile = load_device_profile(request.device) if request.device else None
    model, meta = load_checkpoint(request.checkpoint, add_adapters=False)
    if not model.has_adapters:
        raise MordasrError(f"{request.checkpoint} is a base checkpoint without adapters; train adapters first "
                           "(mordasr-train adapters)")
    kind = model.config.adapter.kind
    if request.mode:
        check_mode(kind, request.mode)
    plan = make_plan(default_profile(model.config.preset), MODES_BY_ADAPTER[kind], device=profile,
                     sizes={k: parse_size(v) if v else None for k, v in request.sizes.items()},
                     workspace_mb=request.workspace_mb, optimization_level=request.optimization_level,
                     precision=request.precision, component_precision=request.component_precision,
                     fp32_fallback=request.fp32_fallback or None, mode=request.mode, max_batch=request.max_batch)
    out = Path(request.out)
    for path in {out, fp32_path(out, plan.headline_precision)}:
        if path.exists() and not request.force:
            raise MordasrError(f"{path} already exists (pass --force to replace it)")
    for text in plan.notes:
        note(text)
    sizes = {k: f"{w}x{h}" for k, (h, w) in plan.sizes.items()}
    options = EngineOptions(sizes["min"], sizes["opt"], sizes["max"], refittable=request.refittable,
                            strongly_typed=True if request.strongly_typed else None, workspace_mb=plan.workspace_mb,
                            optimization_level=plan.optimization_level, tactic_dram_mb=plan.tactic_dram_mb)
    return model, meta, plan, options


def _build_engines(staging: Path, result: ExportResult) -> list[tuple[Path, EngineSpec]]:
    """TensorRT engines for the staged bundles, recorded in their manifests (see export/engines.py)."""
    from mordasr.export.engines import build_engines
    from mordasr.runtime.manifest import load_manifest
    from mordasr.runtime.trt_settings import recorded_engine_options

    built = []
    for final in dict.fromkeys([result.fp32_out, result.out]):
        staged = staging / final.name
        built += [(final, spec) for spec in build_engines(staged, recorded_engine_options(load_manifest(staged)))]
    return built


def _export_staged(request: ExportRequest, model, meta: dict, plan: ExportPlan, options, staging: Path,
                   note: Note, on_graph: OnGraph | None) -> ExportResult:
    from mordasr.export.device_plan import device_record, export_to_fit, fit_to_device
    from mordasr.export.engine_script import write_engine_scripts
    from mordasr.export.memory import MIB, estimate_bundle
    from mordasr.runtime.manifest import load_manifest

    out, headline = Path(request.out), plan.headline_precision
    staged_out = staging / out.name
    staged_fp32 = staging / fp32_path(out, headline).name

    def export_mode(mode: str) -> list[Path]:
        _export_fp32(request, model, meta, plan, mode, staged_fp32, final=fp32_path(out, headline),
                     on_graph=on_graph)
        if headline:
            from mordasr.calib.calibrate import DEFAULT_CALIB_IMAGES, DEFAULT_EVAL_IMAGES, calibrate
            from mordasr.calib.gate import Gate
            from mordasr.calib.int8 import DEFAULT_KEEP_FLOAT

            calibrate(staged_fp32, staged_out, headline, checkpoint=request.checkpoint,
                      calib_images=DEFAULT_CALIB_IMAGES, calib_dir=None, method="minmax", smoothquant=False,
                      keep_float=DEFAULT_KEEP_FLOAT, gate=Gate(request.min_psnr, request.max_hr_loss),
                      eval_images=DEFAULT_EVAL_IMAGES, seed=request.seed, force=True, quiet=request.quiet,
                      components=plan.precisions, fp32_fallback=plan.fp32_fallback,
                      failed_to=out.with_name(out.name + ".failed"))
        return [staged_fp32] + ([staged_out] if headline else [])

    estimate, switch, written = export_to_fit(plan, staged_out, export_mode, note)
    # A bundle whose buckets are switched by refit gets engines that can refit.
    options = replace(options, refittable=options.refittable or switch == "refit")
    for path in written:
        manifest = load_manifest(path)
        path_estimate = estimate if path == staged_out else fit_to_device(path, manifest, plan)[0]
        cpu = estimate_bundle(path, manifest, path_estimate.output_size, runtime="onnxruntime-cpu")
        memory = {**path_estimate.to_dict(), "onnxruntime_cpu_total_mib": round(cpu.total / MIB, 1)}
        manifest = replace(manifest, device=device_record(plan, switch), memory=memory,
                           engine_options=options.to_dict())
        manifest.write(path)
        write_engine_scripts(path, manifest, options)
    return ExportResult(out, fp32_path(out, headline), plan, estimate, switch)


def _export_fp32(request: ExportRequest, model, meta: dict, plan: ExportPlan, mode: str, path: Path, final: Path,
                 on_graph: OnGraph | None) -> None:
    from mordasr.export.buckets import default_buckets, grid_buckets
    from mordasr.export.bundle import export_bundle

    count = request.buckets if mode == "folded" else 1  # other modes record one bucket for reference
    if request.bucket_placement == "grid":
        buckets = grid_buckets(count, [p[0] for p in model.config.prompts])
    else:
        buckets = default_buckets(model, count, request.calib_samples, request.seed)
    total = 2 + 2 * len(buckets) if mode == "folded" else 4
    source = {**checkpoint_source(request.checkpoint, final), "bucket_placement": request.bucket_placement,
              **imported_source(meta)}
    export_bundle(model, path, mode, buckets, opset=request.opset, slim=request.slim, force=True,
                  random_weights=bool(meta.get("random_weights")), weight_packs=request.weight_packs,
                  profile=plan.sizes, max_batch=plan.max_batch, source=source,
                  on_graph=(lambda file: on_graph(mode, file, total)) if on_graph else None)


def checkpoint_source(checkpoint: Path, bundle: Path) -> dict[str, str]:
    """Where the bundle came from, findable from any working directory: absolute, and relative to
    the bundle's final place (for a bundle moved together with its checkpoint)."""
    return {"checkpoint": str(Path(checkpoint).resolve()),
            "checkpoint_from_bundle": os.path.relpath(Path(checkpoint).resolve(), Path(bundle).resolve())}


def imported_source(meta: dict) -> dict:
    """For a checkpoint from mordasr-import: its origin and the prompt baked into the UNet."""
    return {key: meta[key] for key in ("imported", "text_conditioning") if key in meta}


def _write_triton(bundle: Path, repo: Path, engines: bool, note: Note) -> list[str]:
    from mordasr.export.triton import TritonOptions, validate_repository, write_triton_repository

    models = write_triton_repository(bundle, repo, TritonOptions(engines=engines), force=True)
    try:
        problems = validate_repository(repo)
    except MordasrError as err:  # tritonclient missing: the repository is written, unchecked
        note(f"{repo} not validated: {err}")
        problems = []
    if problems:
        raise MordasrError(f"{repo}: " + "; ".join(problems))
    return models
