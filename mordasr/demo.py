"""``mordasr-demo``: the main job end to end on the tiny preset.

Train adapters briefly on the shipped tiny base -> export an ONNX bundle -> degrade a held-out
photograph x4 (blur, noise, JPEG) -> restore it with the torch-free runtime -> write before/after
images and print PSNR/SSIM of bicubic upsampling and of the restored image against the original.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from mordasr.runtime.manifest import MODES

DEMO_DEGRADATION = {"blur_sigma": 1.2, "noise_sigma": 8 / 255, "jpeg_quality": 60}


def _quality(image, reference) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from mordasr.runtime.images import to_uint8

    a, b = to_uint8(image), to_uint8(reference)
    return (peak_signal_noise_ratio(b, a, data_range=255),
            structural_similarity(b, a, channel_axis=-1, data_range=255))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the checkpoint, the bundle and the images.")
@click.option("--steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="Adapter training steps (about 1.2 s each on 2 CPU cores).")
@click.option("--adapter", type=click.Choice(["mor", "lora", "adaptir"]), default="mor", show_default=True)
@click.option("--mode", type=click.Choice(MODES), default=None,
              help="Export mode of the bundle (see mordasr-export --help) [default: folded for "
                   "MoR, dense-lora for LoRA].")
@click.option("--buckets", type=click.IntRange(min=1), default=4, show_default=True,
              help="Folded mode: number of degradation buckets.")
@click.option("--image", type=click.Choice(["astronaut", "chelsea"]), default="astronaut", show_default=True,
              help="Held-out photograph (never seen in training) to degrade and restore.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def main(out: Path, steps: int, adapter: str, mode: str, buckets: int, image: str, seed: int,
         quiet: bool) -> None:
    """Train (briefly), export, and run MoR-DASR on a real degraded photograph."""
    import numpy as np
    import torch
    from PIL import Image

    from mordasr.errors import MordasrError
    from mordasr.export.buckets import default_buckets
    from mordasr.export.bundle import check_mode, default_mode, export_bundle
    from mordasr.model.io import load_checkpoint, tiny_base_path
    from mordasr.runtime import Restorer
    from mordasr.runtime.images import read_image, write_image
    from mordasr.training.adapter_trainer import AdapterTrainingConfig, train_adapters
    from mordasr.training.data import load_sample_image
    from mordasr.training.synthetic import Degradation, degrade

    mode = mode or default_mode(adapter)
    try:
        check_mode(adapter, mode)
    except MordasrError as err:
        raise click.UsageError(str(err)) from None

    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    click.echo(f"[1/4] training {adapter} adapters on the shipped tiny base for {steps} steps")
    model, _ = load_checkpoint(tiny_base_path(), adapter=adapter)
    metrics = train_adapters(model, AdapterTrainingConfig(steps=steps, seed=seed),
                             out / "checkpoint", quiet=quiet)
    click.echo(f"      held-out crops: PSNR {metrics['psnr']:.2f} dB (bicubic {metrics['psnr_bicubic']:.2f} dB)")

    click.echo(f"[2/4] exporting a {mode} ONNX bundle")
    n_buckets = buckets if mode == "folded" and adapter == "mor" else 1
    manifest = export_bundle(model, out / "bundle", mode, default_buckets(model, n_buckets, seed=seed),
                             force=True, source={"checkpoint": str(out / "checkpoint")})
    click.echo(f"      {len(manifest.graphs)} graphs, buckets: " + ", ".join(b.label for b in manifest.buckets))

    click.echo(f"[3/4] degrading held-out '{image}' x{manifest.scale} "
               f"(blur {DEMO_DEGRADATION['blur_sigma']}, noise {DEMO_DEGRADATION['noise_sigma'] * 255:.0f}/255, "
               f"JPEG q{DEMO_DEGRADATION['jpeg_quality']})")
    hr = load_sample_image(image)
    m = manifest.scale * manifest.lr_multiple
    hr = hr[: hr.shape[0] // m * m, : hr.shape[1] // m * m]
    lr = degrade(hr, Degradation(**DEMO_DEGRADATION), manifest.scale, np.random.default_rng(seed))
    write_image(out / "hr.png", hr)
    write_image(out / "lr.png", lr)

    click.echo("[4/4] restoring with the torch-free runtime (ONNX Runtime, CPU)")
    restorer = Restorer(out / "bundle")
    lr_read = read_image(out / "lr.png")
    start = time.perf_counter()
    result = restorer.restore(lr_read)
    seconds = time.perf_counter() - start
    write_image(out / "restored.png", result.image)
    h, w = hr.shape[:2]
    bicubic = np.asarray(Image.fromarray((lr_read * 255 + 0.5).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                         dtype=np.float32) / 255
    write_image(out / "bicubic.png", bicubic)

    psnr_b, ssim_b = _quality(bicubic, hr)
    psnr_r, ssim_r = _quality(result.image, hr)
    names = [d["name"] for d in manifest.degradations]
    click.echo("      scores: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, result.scores))
               + (f" -> bucket {manifest.buckets[result.bucket].label}" if result.bucket is not None else ""))
    click.echo("")
    click.echo(f"{image} {w}x{h} from {lr.shape[1]}x{lr.shape[0]}   PSNR (dB)   SSIM")
    for label, psnr, ssim in (("bicubic upsampling", psnr_b, ssim_b),
                              (f"MoR-DASR tiny ({adapter}, {mode})", psnr_r, ssim_r)):
        click.echo(f"  {label:<30} {psnr:7.2f}   {ssim:.4f}")
    click.echo(f"restore took {seconds:.2f} s; whole demo {time.perf_counter() - t0:.0f} s")
    click.echo(f"images: {out / 'lr.png'}, {out / 'bicubic.png'}, {out / 'restored.png'}, {out / 'hr.png'}")
    if not np.isfinite(result.image).all():
        sys.exit(1)


if __name__ == "__main__":
    main()
