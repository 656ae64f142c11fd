"""``mordasr-calib``: FP16 or INT8 bundle from an FP32 bundle, with an accuracy report."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import click

from mordasr.calib.int8 import CALIBRATION_METHODS, DEFAULT_KEEP_FLOAT
from mordasr.cli_errors import failer
from mordasr.errors import MordasrError

_fail = failer("mordasr-calib")

DEFAULT_CALIB_IMAGES = 32
DEFAULT_EVAL_IMAGES = 4


def precision_map_options(overrides: str):
    """``--component-precision`` and ``--fp32-fallback``, shared by mordasr-calib and mordasr-export."""
    def decorate(command):
        command = click.option(
            "--fp32-fallback", multiple=True, type=click.Choice(["encoder", "unet", "decoder"]),
            help="Also ship this component's FP32 graph; mordasr-run reruns it when the reduced-precision "
                 "output is NaN/inf (repeat the option; FP16 VAE decoders need it most).")(command)
        return click.option(
            "--component-precision", default=None, metavar="C=P,...",
            help="Per-component precision, e.g. unet=int8,decoder=fp32 (encoder, unet, decoder; the "
                 f"router stays fp32); overrides {overrides}.")(command)
    return decorate


def calibrate(bundle: Path, out: Path, precision: str, *, checkpoint: Path | None, calib_images: int,
              calib_dir: Path | None, method: str, smoothquant: bool, keep_float: tuple[str, ...],
              min_psnr: float | None, eval_images: int, seed: int, force: bool, quiet: bool,
              components: dict[str, str] | None = None, fp32_fallback: tuple[str, ...] = ()) -> list[dict]:
    """Build, evaluate and (if it passes) place the bundle at ``out``; return the report rows.

    A bundle that fails ``min_psnr`` (or produces non-finite images) is moved to ``OUT.failed``
    instead, and MordasrError is raised.
    """
    from tqdm import tqdm

    from mordasr.calib.data import folder_images, synthetic_images
    from mordasr.calib.precision_bundle import (
        build_precision_bundle,
        bundle_precision,
        component_precisions,
        load_fp32_manifest,
    )
    from mordasr.calib.report import accuracy_report, failing_rows, format_table, write_report
    from mordasr.model.io import load_checkpoint

    if out.exists() and not force:
        raise MordasrError(f"{out} already exists (pass --force to replace it)")
    if calib_images < 1:
        raise MordasrError("--calib-images must be at least 1")
    manifest = load_fp32_manifest(bundle)
    chosen = component_precisions(precision, components)
    label = bundle_precision(chosen)
    checkpoint = checkpoint or source_checkpoint(manifest.source, bundle)
    if not checkpoint or not (checkpoint / "config.json").is_file():
        raise MordasrError("the FP32 PyTorch reference is needed for the accuracy report: pass --checkpoint "
                           "(the checkpoint the bundle was exported from)")
    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    if model.config.preset != manifest.preset or model.config.adapter.kind != manifest.adapter:
        raise MordasrError(f"{checkpoint} is a {model.config.preset}/{model.config.adapter.kind} checkpoint, "
                           f"the bundle is {manifest.preset}/{manifest.adapter}")
    images, source = None, "synthetic"
    if "int8" in chosen.values():
        if calib_dir is not None:
            images, source = folder_images(calib_dir, calib_images, seed), str(calib_dir)
        else:
            images = synthetic_images(calib_images, manifest.scale, seed=seed)
    per_bucket = len(images) if images is not None else 0
    if images is not None and manifest.mode == "folded":
        per_bucket = max(1, len(images) // len(manifest.buckets))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        converted = sum(chosen.get(g.component, "fp32") != "fp32" for g in manifest.graphs)
        with tqdm(total=converted, desc=label, unit="graph", disable=quiet, file=sys.stderr) as bar:
            build_precision_bundle(bundle, stage, precision, images=images, per_bucket=per_bucket,
                                   method=method, smoothquant=smoothquant, keep_float=keep_float,
                                   source=source, seed=seed, on_graph=lambda _: bar.update(1),
                                   components=chosen, fp32_fallback=fp32_fallback)
        rows = accuracy_report(model, {"fp32": bundle, label: stage}, eval_images)
        notes = [f"FP32 reference: PyTorch checkpoint {checkpoint}",
                 f"evaluation: {eval_images} degraded crops of held-out photographs per bucket "
                 "(folded bundles force every image through each bucket)",
                 "router graph stays FP32 in every precision",
                 "components: " + ", ".join(f"{c} {p}" for c, p in chosen.items())]
        if min_psnr is not None:
            notes.append(f"threshold: PSNR vs FP32 >= {min_psnr} dB")
        write_report(rows, stage, f"Accuracy of the {label} {manifest.mode} bundle", notes)
        if not quiet:
            click.echo(format_table(rows))
        bad = failing_rows(rows, min_psnr, label)
        stage.chmod(0o755)
        if bad:
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            stage.rename(failed)
            worst = min(bad, key=lambda r: r["psnr_vs_fp32_torch"])
            raise MordasrError(f"{label} bundle failed the accuracy check (bucket {worst['label']}: "
                               f"{worst['psnr_vs_fp32_torch']:.2f} dB vs FP32); kept at {failed}, not at {out}")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return rows


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True,
              help="fp16: FP16 graphs, float32 I/O, norms/softmax kept FP32. int8: explicit Q/DQ "
                   "(symmetric, per-channel weights, per-tensor activations, float bias).")
@precision_map_options("--precision")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="PyTorch checkpoint the bundle came from (FP32 reference) [default: the one "
                   "recorded in the bundle's manifest].")
@click.option("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES, show_default=True,
              help="INT8: calibration images, split evenly over the buckets (each bucket takes the "
                   "images whose scores lie nearest its centre).")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None,
              help="INT8: folder of low-resolution images to calibrate on [default: synthetic "
                   "degradations of the training photographs].")
@click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="INT8: activation range estimator (percentile keeps the 99.99th percentile).")
@click.option("--smoothquant", is_flag=True, help="INT8: apply SmoothQuant (alpha 0.5) before quantizing.")
@click.option("--keep-float", multiple=True, default=DEFAULT_KEEP_FLOAT, show_default=True,
              help="INT8: node-name substrings kept in float (repeat the option).")
@click.option("--min-psnr", type=float, default=None,
              help="Fail (and do not write OUT) when any bucket's PSNR vs FP32 PyTorch is below this, in dB.")
@click.option("--eval-images", type=click.IntRange(min=1), default=DEFAULT_EVAL_IMAGES, show_default=True,
              help="Held-out degraded crops per bucket for the accuracy report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (calibration is deterministic).")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.option("-q", "--quiet", is_flag=True)
def main(bundle: Path, out: Path, precision: str, component_precision: str | None,
         fp32_fallback: tuple[str, ...], checkpoint: Path | None, calib_images: int,
         calib_dir: Path | None, calib_method: str, smoothquant: bool, keep_float: tuple[str, ...],
         min_psnr: float | None, eval_images: int, seed: int, force: bool, quiet: bool) -> None:
    """Convert the FP32 BUNDLE (from mordasr-export) to FP16 or INT8 and report its accuracy.

    Writes OUT with accuracy.md / accuracy.json beside the graphs: per bucket and precision, PSNR
    and SSIM against the FP32 PyTorch output and against the HR image, cosine similarity of the
    UNet output, and the max abs error.
    """
    from mordasr.calib.precision_bundle import parse_precision_map

    logging.basicConfig(level=logging.ERROR)
    try:
        calibrate(bundle, out, precision, checkpoint=checkpoint, calib_images=calib_images, calib_dir=calib_dir,
                  method=calib_method, smoothquant=smoothquant, keep_float=keep_float, min_psnr=min_psnr,
                  eval_images=eval_images, seed=seed, force=force, quiet=quiet,
                  components=parse_precision_map(component_precision), fp32_fallback=fp32_fallback)
    except (MordasrError, ValueError) as err:
        _fail(str(err), 1 if "failed the accuracy check" in str(err) else 2)
    if not quiet:
        click.echo(f"wrote {out} (report: {out / 'accuracy.md'})")


def source_checkpoint(source: dict, bundle: Path) -> Path | None:
    """The checkpoint a bundle was exported from: beside the bundle as recorded relative to it,
    else at its absolute path (older bundles: relative to the directory the export ran in)."""
    relative = source.get("checkpoint_from_bundle")
    if relative and (Path(bundle) / relative / "config.json").is_file():
        return Path(bundle) / relative
    recorded = source.get("checkpoint")
    return Path(recorded) if recorded else None


if __name__ == "__main__":
    main()
