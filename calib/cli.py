"""``mordasr-calib``: FP16 or INT8 bundle from an FP32 bundle, with an accuracy report."""

from __future__ import annotations

from pathlib import Path

import click

from mordasr.calib.calibrate import DEFAULT_CALIB_IMAGES, DEFAULT_EVAL_IMAGES, DEFAULT_MIN_PER_BUCKET, calibrate
from mordasr.calib.gate import DEFAULT_MAX_HR_LOSS, DEFAULT_MIN_PSNR, Gate
from mordasr.calib.int8 import CALIBRATION_METHODS, DEFAULT_KEEP_FLOAT
from mordasr.cli_errors import fail_on_errors
from mordasr.runtime.cli_options import precision_map_options, verbosity


@click.command("mordasr-calib", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True,
              help="fp16: FP16 graphs, float32 I/O, norms/softmax kept FP32. int8: explicit Q/DQ "
                   "(symmetric, per-channel weights, per-tensor activations, float bias).")
@precision_map_options("--precision")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="PyTorch checkpoint the bundle came from (FP32 reference) [default: the one "
                   "recorded in the bundle's manifest].")
@click.option("--calib-images", type=click.IntRange(min=1), default=DEFAULT_CALIB_IMAGES, show_default=True,
              help="INT8: calibration images; each bucket calibrates on the --min-per-bucket of them whose "
                   "scores lie nearest its centre.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None,
              help="INT8: folder of low-resolution images to calibrate on [default: synthetic "
                   "degradations of the training photographs].")
@click.option("--calib-method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True,
              help="INT8: activation range estimator (percentile keeps the 99.99th percentile).")
@click.option("--smoothquant", is_flag=True, help="INT8: apply SmoothQuant (alpha 0.5) before quantizing.")
@click.option("--keep-float", multiple=True, default=DEFAULT_KEEP_FLOAT, show_default=True,
              help="INT8: node-name substrings kept in float (repeat the option).")
@click.option("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, show_default=True,
              help="Accuracy gate: every bucket's PSNR against the FP32 PyTorch output must be at least this (dB); "
                   "a bundle that fails goes to OUT.failed and the command exits 1.")
@click.option("--max-hr-loss", type=click.FloatRange(min=0), default=DEFAULT_MAX_HR_LOSS, show_default=True,
              help="Accuracy gate: every bucket's PSNR against HR may fall at most this many dB below FP32's.")
@click.option("--min-per-bucket", type=click.IntRange(min=1), default=DEFAULT_MIN_PER_BUCKET, show_default=True,
              help="INT8: calibration images each bucket's graphs see (its nearest: routed to it, or forced "
                   "through it); fewer --calib-images than this are refused.")
@click.option("--no-mixed-precision", is_flag=True,
              help="INT8: do not keep the layers that break the gate in float (by default the most sensitive "
                   "layers of a failing bucket stay float until it passes).")
@click.option("--eval-images", type=click.IntRange(min=1), default=DEFAULT_EVAL_IMAGES, show_default=True,
              help="Held-out degraded crops per bucket for the accuracy report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (calibration is deterministic).")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@verbosity
def main(bundle: Path, out: Path, precision: str, component_precision: str | None,
         fp32_fallback: tuple[str, ...], checkpoint: Path | None, calib_images: int,
         calib_dir: Path | None, calib_method: str, smoothquant: bool, keep_float: tuple[str, ...],
         min_psnr: float, max_hr_loss: float, min_per_bucket: int, no_mixed_precision: bool, eval_images: int,
         seed: int, force: bool, quiet: bool) -> None:
    """Convert the FP32 BUNDLE (from mordasr-export) to FP16 or INT8, check it against FP32, and
    place it at OUT only when every bucket passes the accuracy gate.

    Writes OUT with accuracy.md / accuracy.json beside the graphs: per bucket and precision, PSNR
    and SSIM against the FP32 PyTorch output and against the HR image, cosine similarity of the
    UNet output, the max abs error, the gate and the layers kept float. A bundle that fails the gate
    is kept at OUT.failed and the command exits 1.
    """
    from mordasr.calib.precision_bundle import parse_precision_map

    with fail_on_errors("mordasr-calib"):
        calibrate(bundle, out, precision, checkpoint=checkpoint, calib_images=calib_images, calib_dir=calib_dir,
                  method=calib_method, smoothquant=smoothquant, keep_float=keep_float,
                  gate=Gate(min_psnr, max_hr_loss), min_per_bucket=min_per_bucket,
                  mixed_precision=not no_mixed_precision, eval_images=eval_images, seed=seed, force=force,
                  quiet=quiet, components=parse_precision_map(component_precision), fp32_fallback=fp32_fallback,
                  report=(lambda text: None) if quiet else click.echo)
    if not quiet:
        click.echo(f"wrote {out} (report: {out / 'accuracy.md'})")


if __name__ == "__main__":
    main()
