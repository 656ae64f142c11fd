"""``mordasr-export``: an adapted checkpoint -> an ONNX bundle with a manifest."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from mordasr.calib.int8 import DEFAULT_KEEP_FLOAT
from mordasr.errors import MordasrError
from mordasr.runtime.manifest import MODES


def _fail(message: str) -> None:
    click.echo(f"mordasr-export: error: {message}", err=True)
    sys.exit(2)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (manifest.json + one .onnx per graph).")
@click.option("--mode", type=click.Choice(MODES), default="folded", show_default=True,
              help="folded: one encoder+UNet graph per bucket with routing merged into the "
                   "weights (costs exactly the base model); gated: one graph set taking the "
                   "degradation scores as an input (base + low-rank branch).")
@click.option("--buckets", "num_buckets", type=click.IntRange(min=1), default=4, show_default=True,
              help="Folded mode: number of buckets, k-means centres of the estimator's scores "
                   "on degraded training crops (dense LoRA always has 1).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=256, show_default=True,
              help="Degraded crops scored to place the buckets.")
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
def main(checkpoint: Path, out: Path, mode: str, num_buckets: int, calib_samples: int, opset: int,
         no_slim: bool, seed: int, precision: str | None, min_psnr: float | None, force: bool,
         quiet: bool) -> None:
    """Export CHECKPOINT (a folder written by mordasr-train) to an ONNX bundle.

    Graphs: router (CLIP image tower + stored prompt embeddings -> scores), encoder (bicubic
    upsample + VAE encoder, latent mean), unet (t and text conditioning baked in), decoder.
    Each graph is constant-folded, slimmed and checked by onnx.checker with shape inference.
    """
    logging.basicConfig(level=logging.WARNING)
    fp32_out = out.with_name(out.name + "-fp32") if precision else out
    for path in {out, fp32_out}:
        if path.exists() and not force:
            _fail(f"{path} already exists (pass --force to replace it)")
    from tqdm import tqdm

    from mordasr.export.buckets import default_buckets
    from mordasr.export.bundle import export_bundle
    from mordasr.model.io import load_checkpoint

    try:
        model, meta = load_checkpoint(checkpoint, add_adapters=False)
        if not model.has_adapters:
            _fail(f"{checkpoint} is a base checkpoint without adapters; train adapters first "
                  "(mordasr-train adapters)")
        if model.config.adapter.kind == "lora" and num_buckets != 1:
            num_buckets = 1  # dense LoRA gates are the same for every image
        if mode == "folded":
            buckets = default_buckets(model, num_buckets, calib_samples, seed)
        else:
            buckets = default_buckets(model, 1, calib_samples, seed)  # recorded for reference
        total = 2 + (2 * len(buckets) if mode == "folded" else 2)
        with tqdm(total=total, desc="export", unit="graph", disable=quiet, file=sys.stderr) as bar:
            def on_graph(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update(1)

            manifest = export_bundle(model, fp32_out, mode, buckets, opset=opset, slim=not no_slim,
                                     force=force, random_weights=bool(meta.get("random_weights")),
                                     source={"checkpoint": str(checkpoint)}, on_graph=on_graph)
        if precision:
            from mordasr.calib.cli import DEFAULT_CALIB_IMAGES, DEFAULT_EVAL_IMAGES, calibrate

            calibrate(fp32_out, out, precision, checkpoint=checkpoint, calib_images=DEFAULT_CALIB_IMAGES,
                      calib_dir=None, method="minmax", smoothquant=False, keep_float=DEFAULT_KEEP_FLOAT,
                      min_psnr=min_psnr, eval_images=DEFAULT_EVAL_IMAGES, seed=seed, force=force, quiet=quiet)
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    if not quiet:
        if precision:
            click.echo(f"wrote {out} ({precision}, accuracy report in {out / 'accuracy.md'}) and {fp32_out} (fp32)")
        click.echo(f"wrote {fp32_out}: {manifest.mode} {manifest.adapter} bundle, "
                   f"{len(manifest.graphs)} graphs, {len(manifest.buckets)} bucket(s)")
        for b in manifest.buckets:
            click.echo(f"  {b.label}: " + " ".join(f"{v:.2f}" for v in b.centre))
