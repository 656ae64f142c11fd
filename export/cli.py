"""``mordasr-export``: an adapted checkpoint -> an ONNX bundle with a manifest."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mordasr.calib.gate import DEFAULT_MAX_HR_LOSS, DEFAULT_MIN_PSNR
from mordasr.cli_errors import fail_on_errors
from mordasr.runtime.cli_options import precision_map_options, verbosity
from mordasr.runtime.manifest import MODES


@click.command("mordasr-export", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, show_default=True,
              help="With --fp16/--int8: the accuracy gate's floor, every bucket's PSNR vs FP32 PyTorch (dB).")
@click.option("--max-hr-loss", type=click.FloatRange(min=0), default=DEFAULT_MAX_HR_LOSS, show_default=True,
              help="With --fp16/--int8: the most PSNR against HR a bucket may lose relative to FP32 (dB).")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@verbosity
def main(checkpoint: Path, out: Path, mode: str | None, num_buckets: int, bucket_placement: str,
         calib_samples: int, no_weight_packs: bool, device: str | None, min_size: str, opt_size: str,
         max_size: str, component_precision: str | None, fp32_fallback: tuple[str, ...], refittable: bool,
         max_batch: int | None, workspace_mb: int | None, opt_level: int | None, strongly_typed: bool, build_now: bool,
         triton_dir: Path | None, opset: int, no_slim: bool, seed: int, precision: str | None, min_psnr: float,
         max_hr_loss: float, force: bool, quiet: bool) -> None:
    """Export CHECKPOINT (a folder written by mordasr-train) to an ONNX bundle.

    Graphs: router (CLIP image tower + stored prompt embeddings -> scores), encoder (bicubic
    upsample + VAE encoder, latent mean), unet (t and text conditioning baked in), decoder.
    Each graph is constant-folded, slimmed, checked by onnx.checker with shape inference, and
    linted against the ONNX operators TensorRT 10 and 11 parse. Every bundle also gets
    build_engines.sh (Polygraphy builds on the target device, trtexec as a fallback) and
    verify_engines.sh (each engine against ONNX Runtime); --engines builds here when TensorRT
    imports. The memory the bundle needs at --max-size (weights, activations per graph) is
    printed and kept in the manifest; with --device it must fit the device's budget. The bundle
    is built beside OUT and renamed into place when complete: a refusal leaves nothing at OUT.
    """
    from tqdm import tqdm

    from mordasr.calib.precision_bundle import parse_precision_map
    from mordasr.export.pipeline import ExportRequest, run_export

    bars: dict[str, tqdm] = {}

    def on_graph(mode: str, file: str, total: int) -> None:
        bar = bars.setdefault(mode, tqdm(total=total, desc=f"export {mode}", unit="graph", disable=quiet,
                                         file=sys.stderr))
        bar.set_postfix_str(file)
        bar.update(1)

    with fail_on_errors("mordasr-export"):
        request = ExportRequest(
            checkpoint, out, mode=mode, buckets=num_buckets, bucket_placement=bucket_placement,
            calib_samples=calib_samples, weight_packs=not no_weight_packs, device=device,
            sizes={"min": min_size, "opt": opt_size, "max": max_size},
            component_precision=parse_precision_map(component_precision), fp32_fallback=fp32_fallback,
            precision=precision, min_psnr=min_psnr, max_hr_loss=max_hr_loss, refittable=refittable,
            max_batch=max_batch, workspace_mb=workspace_mb, optimization_level=opt_level,
            strongly_typed=strongly_typed, build_engines=build_now, triton_dir=triton_dir, opset=opset,
            slim=not no_slim, seed=seed, force=force,
            quiet=quiet)
        try:
            result = run_export(request, note=lambda text: click.echo(f"note: {text}", err=True), on_graph=on_graph)
        finally:
            for bar in bars.values():
                bar.close()
    if not quiet:
        _report(result, triton_dir)


def _report(result, triton_dir: Path | None) -> None:
    """What was written: the bundles, buckets, memory estimate, engines, Triton repository."""
    from mordasr.runtime.manifest import load_manifest

    final, manifest = load_manifest(result.out), load_manifest(result.fp32_out)
    if result.out != result.fp32_out:
        click.echo(f"wrote {result.out} ({final.precision}: " + ", ".join(
            f"{c} {p}" for c, p in result.plan.precisions.items()) + f"; accuracy report in "
            f"{result.out / 'accuracy.md'}) and {result.fp32_out} (fp32)")
    click.echo(f"wrote {result.fp32_out}: {manifest.mode} {manifest.adapter} bundle, {len(manifest.graphs)} graphs, "
               f"{len(manifest.buckets)} bucket(s), {len(manifest.weight_packs)} weight packs, build_engines.sh, "
               "verify_engines.sh")
    for b in manifest.buckets:
        click.echo(f"  {b.label}: " + " ".join(f"{v:.2f}" for v in b.centre))
    click.echo(result.estimate.table())
    click.echo(f"  on ONNX Runtime's CPU backend (one shared arena): about "
               f"{final.memory['onnxruntime_cpu_total_mib']:.0f} MiB")
    for path, engine in result.engines:
        click.echo(f"built {path / engine.file} ({engine.build_seconds:.1f} s)")
    if result.triton_models is not None:
        click.echo(f"wrote Triton repository {triton_dir} ({len(result.triton_models)} models; start: see "
                   f"{triton_dir / 'README.md'})")
    if result.plan.device is not None:
        device_profile = result.plan.device
        click.echo(f"device {device_profile.name}: budget {device_profile.budget_bytes / 2**20:.0f} MiB "
                   f"({device_profile.memory_budget:.0%} of {device_profile.memory_gib:g} GiB); "
                   f"bucket switch {result.bucket_switch}")


if __name__ == "__main__":
    main()
