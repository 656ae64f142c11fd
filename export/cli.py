"""``mordasr-export``: an adapted checkpoint -> an ONNX bundle with a manifest."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from mordasr.calib.cli import precision_map_options
from mordasr.calib.int8 import DEFAULT_KEEP_FLOAT
from mordasr.cli_errors import failer
from mordasr.errors import MordasrError
from mordasr.runtime.manifest import MODES

_fail = failer("mordasr-export")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (manifest.json + one .onnx per graph).")
@click.option("--mode", type=click.Choice(MODES), default=None,
              help="folded: one encoder+UNet graph per bucket with routing merged into the "
                   "weights (costs exactly the base model); gated: one graph set taking the "
                   "degradation scores as an input (base + low-rank branch); hybrid: shared ranks "
                   "merged, routed ranks gated; dense-lora: the merged LoRA baseline (LoRA "
                   "checkpoints); adaptir: the UNet with its AdaptIR branches, FFTs as matrix "
                   "products (AdaptIR checkpoints). [default: folded for MoR, dense-lora for LoRA, "
                   "adaptir for AdaptIR]")
@click.option("--buckets", "num_buckets", type=click.IntRange(min=1), default=4, show_default=True,
              help="Folded mode: number of buckets.")
@click.option("--bucket-placement", type=click.Choice(["kmeans", "grid"]), default="kmeans", show_default=True,
              help="kmeans: centres of the estimator's scores on degraded training crops; grid: "
                   "evenly spaced severities (every score equal) from mild to severe.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Degraded crops scored to place k-means buckets.")
@click.option("--no-weight-packs", is_flag=True,
              help="Folded mode: skip the per-bucket weight packs (packs/*.safetensors) that let one "
                   "refittable engine switch buckets.")
@click.option("--device", default=None, metavar="NAME|FILE",
              help="Device profile to export for: orin-nano-8gb, orin-nx-16gb, agx-orin-64gb, thor, "
                   "desktop-24gb, desktop-80gb, a name from $MORDASR_DEVICE_PROFILES, or a .json file. "
                   "It sets the engine sizes, builder memory caps, per-component precision, FP32 "
                   "fallbacks and the modes to try; the export is refused when the bundle's memory "
                   "estimate exceeds the device's budget. Options given here override it.")
@click.option("--min-size", default=None,
              help="Engine profile: smallest output, N or WxH pixels (converted to latent shapes) "
                   "[default: the device's, else 128 for tiny, 256 for sd21].")
@click.option("--opt-size", default=None,
              help="Engine profile: output size to tune for [default: the device's, else 256 for "
                   "tiny, 512 for sd21].")
@click.option("--max-size", default=None,
              help="Engine profile: largest output; mordasr-run tiles larger images, and the memory "
                   "estimate is taken here [default: the device's, else 512 for tiny, 1024 for sd21].")
@precision_map_options("--fp16/--int8 and the device profile (whose FP32 fallbacks are the default)")
@click.option("--refittable", is_flag=True,
              help="Engines: build bucket 0's encoder and UNet refittable; a folded bundle then builds "
                   "bucket 0 only and switches buckets by refit from its weight packs. Implied by a --device "
                   "whose bucket switch is refit (or one that only fits that way).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Engines: images per graph call the profiles take (mordasr-serve's --max-batch-size, "
                   "Restorer.restore_batch); the router's profile takes 4 windows per image. The runtime "
                   "splits larger batches. Memory is estimated at this batch [default: the device's, else 1].")
@click.option("--workspace-mb", type=click.IntRange(min=16), default=None,
              help="Engines: builder workspace limit in MiB [default: the device's, else 4096].")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None,
              help="Engines: TensorRT builder optimization level [default: the device's, else 3].")
@click.option("--strongly-typed", is_flag=True,
              help="Engines on TensorRT 10: strongly typed network instead of FP16/INT8 builder "
                   "flags (TensorRT 11 is always strongly typed).")
@click.option("--engines", "build_now", is_flag=True,
              help="Also build TensorRT engines here (needs tensorrt and a GPU). Every export writes "
                   "build_engines.sh with the same builds as trtexec lines for the target device.")
@click.option("--triton", "triton_dir", type=click.Path(path_type=Path), default=None,
              help="Also write a Triton Inference Server model repository of the bundle here (one "
                   "model per graph, onnxruntime backend, or tensorrt_plan with --engines, plus the "
                   "'mordasr' pipeline model); see mordasr-triton for its options.")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True,
              help="ONNX opset.")
@click.option("--no-slim", is_flag=True, help="Skip onnxslim graph cleaning.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for bucket placement.")
@click.option("--fp16", "precision", flag_value="fp16",
              help="Also convert to FP16 (see mordasr-calib): OUT gets the FP16 bundle, OUT-fp32 the FP32 one.")
@click.option("--int8", "precision", flag_value="int8",
              help="Also quantize to INT8 with explicit Q/DQ, calibrated per bucket on synthetic "
                   "degradations (see mordasr-calib for the options): OUT gets the INT8 bundle, "
                   "OUT-fp32 the FP32 one.")
@click.option("--min-psnr", type=float, default=None,
              help="With --fp16/--int8: refuse the bundle when a bucket's PSNR vs FP32 PyTorch is below this (dB).")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def main(checkpoint: Path, out: Path, mode: str | None, num_buckets: int, bucket_placement: str,
         calib_samples: int, no_weight_packs: bool, device: str | None, min_size: str, opt_size: str,
         max_size: str, component_precision: str | None, fp32_fallback: tuple[str, ...], refittable: bool,
         max_batch: int | None, workspace_mb: int | None, opt_level: int | None, strongly_typed: bool, build_now: bool,
         triton_dir: Path | None, opset: int, no_slim: bool, seed: int, precision: str | None, min_psnr: float | None,
         force: bool, quiet: bool) -> None:
    """Export CHECKPOINT (a folder written by mordasr-train) to an ONNX bundle.

    Graphs: router (CLIP image tower + stored prompt embeddings -> scores), encoder (bicubic
    upsample + VAE encoder, latent mean), unet (t and text conditioning baked in), decoder.
    Each graph is constant-folded, slimmed, checked by onnx.checker with shape inference, and
    linted against the ONNX operators TensorRT 10 and 11 parse. Every bundle also gets
    build_engines.sh (Polygraphy builds on the target device, trtexec as a fallback) and
    verify_engines.sh (each engine against ONNX Runtime); --engines builds here when TensorRT
    imports. The memory the bundle needs at --max-size (weights, activations per graph) is
    printed and kept in the manifest; with --device it must fit the device's budget.
    """
    logging.basicConfig(level=logging.WARNING)
    from tqdm import tqdm

    from mordasr.calib.precision_bundle import parse_precision_map
    from mordasr.export.buckets import default_buckets, grid_buckets
    from mordasr.export.bundle import MODES_BY_ADAPTER, check_mode, default_profile, export_bundle
    from mordasr.export.device_plan import device_record, export_to_fit, fit_to_device, make_plan, remove_bundles
    from mordasr.export.engine_script import write_engine_scripts
    from mordasr.export.engines import build_engines
    from mordasr.export.memory import MIB, estimate_bundle
    from mordasr.model.io import load_checkpoint
    from mordasr.runtime.devices import load_device_profile
    from mordasr.runtime.manifest import load_manifest
    from mordasr.runtime.trt_settings import EngineOptions, parse_size

    written: list[Path] = []
    if triton_dir is not None and triton_dir.exists() and not force:
        _fail(f"{triton_dir} already exists (pass --force to replace it)")
    try:
        profile = load_device_profile(device) if device else None
        model, meta = load_checkpoint(checkpoint, add_adapters=False)
        if not model.has_adapters:
            _fail(f"{checkpoint} is a base checkpoint without adapters; train adapters first "
                  "(mordasr-train adapters)")
        kind = model.config.adapter.kind
        if mode:
            check_mode(kind, mode)
        plan = make_plan(default_profile(model.config.preset), MODES_BY_ADAPTER[kind], device=profile,
                         sizes={k: parse_size(v) if v else None
                                for k, v in (("min", min_size), ("opt", opt_size), ("max", max_size))},
                         workspace_mb=workspace_mb, optimization_level=opt_level, precision=precision,
                         component_precision=parse_precision_map(component_precision),
                         fp32_fallback=fp32_fallback or None, mode=mode, max_batch=max_batch)
        headline = plan.headline_precision
        fp32_out = out.with_name(out.name + "-fp32") if headline else out
        for path in {out, fp32_out}:
            if path.exists() and not force:
                _fail(f"{path} already exists (pass --force to replace it)")
        sizes = {k: f"{w}x{h}" for k, (h, w) in plan.sizes.items()}
        engine_options = EngineOptions(sizes["min"], sizes["opt"], sizes["max"], refittable=refittable,
                                       strongly_typed=True if strongly_typed else None,
                                       workspace_mb=plan.workspace_mb, optimization_level=plan.optimization_level,
                                       tactic_dram_mb=plan.tactic_dram_mb)
        for note in plan.notes:
            click.echo(f"note: {note}", err=True)

        def export_mode(candidate: str) -> list[Path]:
            k = num_buckets if candidate == "folded" else 1  # other modes record one bucket for reference
            if bucket_placement == "grid":
                buckets = grid_buckets(k, [p[0] for p in model.config.prompts])
            else:
                buckets = default_buckets(model, k, calib_samples, seed)
            total = 2 + 2 * len(buckets) if candidate == "folded" else 4
            with tqdm(total=total, desc=f"export {candidate}", unit="graph", disable=quiet, file=sys.stderr) as bar:
                def on_graph(name: str) -> None:
                    bar.set_postfix_str(name)
                    bar.update(1)

                export_bundle(model, fp32_out, candidate, buckets, opset=opset, slim=not no_slim, force=True,
                              random_weights=bool(meta.get("random_weights")), weight_packs=not no_weight_packs,
                              profile=plan.sizes, max_batch=plan.max_batch,
                              source={**checkpoint_source(checkpoint, fp32_out), "bucket_placement": bucket_placement,
                                      **imported_source(meta)},
                              on_graph=on_graph)
            written.append(fp32_out)
            if headline:
                from mordasr.calib.cli import DEFAULT_CALIB_IMAGES, DEFAULT_EVAL_IMAGES, calibrate

                calibrate(fp32_out, out, headline, checkpoint=checkpoint, calib_images=DEFAULT_CALIB_IMAGES,
                          calib_dir=None, method="minmax", smoothquant=False, keep_float=DEFAULT_KEEP_FLOAT,
                          min_psnr=min_psnr, eval_images=DEFAULT_EVAL_IMAGES, seed=seed, force=True,
                          quiet=quiet, components=plan.precisions, fp32_fallback=plan.fp32_fallback)
                written.append(out)
            done = list(written)
            written.clear()  # export_to_fit owns them now: it removes a mode that does not fit
            return done

        estimate, switch, written = export_to_fit(plan, out, export_mode,
                                                  lambda text: click.echo(f"note: {text}", err=True))
        # A bundle whose buckets are switched by refit gets engines that can refit.
        engine_options = replace(engine_options, refittable=engine_options.refittable or switch == "refit")
        for path in written:
            bundle_manifest = load_manifest(path)
            path_estimate = estimate if path == out else fit_to_device(path, bundle_manifest, plan)[0]
            cpu = estimate_bundle(path, bundle_manifest, path_estimate.output_size, runtime="onnxruntime-cpu")
            memory = {**path_estimate.to_dict(), "onnxruntime_cpu_total_mib": round(cpu.total / MIB, 1)}
            replace(bundle_manifest, device=device_record(plan, switch), memory=memory,
                    engine_options=engine_options.to_dict()).write(path)
            write_engine_scripts(path, load_manifest(path), engine_options)
        written = []  # complete bundles from here on: an engine build failure keeps them
        if build_now:
            for path in [fp32_out] + ([out] if headline else []):
                for engine in build_engines(path, engine_options):
                    if not quiet:
                        click.echo(f"built {path / engine.file} ({engine.build_seconds:.1f} s)")
        if triton_dir is not None:
            _write_triton(out, triton_dir, engines=build_now, quiet=quiet)
    except (MordasrError, ValueError) as err:
        remove_bundles(written)
        _fail(str(err))
    if not quiet:
        final, manifest = load_manifest(out), load_manifest(fp32_out)
        if headline:
            click.echo(f"wrote {out} ({final.precision}: " + ", ".join(f"{c} {p}" for c, p in plan.precisions.items())
                       + f"; accuracy report in {out / 'accuracy.md'}) and {fp32_out} (fp32)")
        click.echo(f"wrote {fp32_out}: {manifest.mode} {manifest.adapter} bundle, "
                   f"{len(manifest.graphs)} graphs, {len(manifest.buckets)} bucket(s), "
                   f"{len(manifest.weight_packs)} weight packs, build_engines.sh, verify_engines.sh")
        for b in manifest.buckets:
            click.echo(f"  {b.label}: " + " ".join(f"{v:.2f}" for v in b.centre))
        click.echo(estimate.table())
        click.echo(f"  on ONNX Runtime's CPU backend (one shared arena): about "
                   f"{final.memory['onnxruntime_cpu_total_mib']:.0f} MiB")
        if profile is not None:
            click.echo(f"device {profile.name}: budget {profile.budget_bytes / 2**20:.0f} MiB "
                       f"({profile.memory_budget:.0%} of {profile.memory_gib:g} GiB); bucket switch {switch}")


def checkpoint_source(checkpoint: Path, bundle: Path) -> dict[str, str]:
    """Where the bundle came from, findable from any working directory: absolute, and relative to
    the bundle (for a bundle moved together with its checkpoint)."""
    return {"checkpoint": str(checkpoint.resolve()),
            "checkpoint_from_bundle": os.path.relpath(checkpoint.resolve(), bundle.resolve())}


def imported_source(meta: dict) -> dict:
    """For a checkpoint from mordasr-import: its origin and the prompt baked into the UNet."""
    return {key: meta[key] for key in ("imported", "text_conditioning") if key in meta}


def _write_triton(bundle: Path, repo: Path, engines: bool, quiet: bool) -> None:
    from mordasr.export.triton import TritonOptions, validate_repository, write_triton_repository

    models = write_triton_repository(bundle, repo, TritonOptions(engines=engines), force=True)
    try:
        problems = validate_repository(repo)
    except MordasrError as err:  # tritonclient missing: the repository is written, unchecked
        click.echo(f"note: {repo} not validated: {err}", err=True)
        problems = []
    if problems:
        raise MordasrError(f"{repo}: " + "; ".join(problems))
    if not quiet:
        click.echo(f"wrote Triton repository {repo} ({len(models)} models; start: see {repo / 'README.md'})")


if __name__ == "__main__":
    main()
