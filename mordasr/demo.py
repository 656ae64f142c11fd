"""``mordasr-demo``: the main job end to end on the tiny preset.

Train adapters briefly on a shipped base (the student of Real-ESRGAN x4plus by default, or the
fidelity base ``tiny``) -> export an ONNX bundle -> degrade a held-out photograph x4 (blur, noise,
JPEG) -> restore it with the torch-free runtime -> write before/after images and print PSNR/SSIM of
bicubic upsampling and of the restored image against the original; for a distilled base, also the
teacher's own result and the student's agreement with it, where the teacher is installed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from mordasr.model.io import DEFAULT_BASE, SHIPPED_BASES
from mordasr.runtime.cli_options import verbosity
from mordasr.runtime.manifest import MODES

DEMO_DEGRADATION = {"blur_sigma": 1.2, "noise_sigma": 8 / 255, "jpeg_quality": 60}


def _quality(image, reference) -> tuple[float, float]:
    """PSNR and SSIM of the 8-bit images, as they are written."""
    from mordasr import metrics
    from mordasr.runtime.images import to_uint8

    a, b = to_uint8(image), to_uint8(reference)
    return metrics.psnr(a, b, 255.0), metrics.ssim(a, b, 255.0)


@click.command("mordasr-demo", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--base", default=DEFAULT_BASE, show_default=True,
              help="The shipped base the adapters are trained on: " + "; ".join(
                  f"{name}: {what}" for name, what in SHIPPED_BASES.items()) + " (or a base checkpoint folder).")
@click.option("--seed", type=int, default=0, show_default=True)
@verbosity
def main(out: Path, steps: int, adapter: str, mode: str, buckets: int, image: str, base: str, seed: int,
         quiet: bool) -> None:
    """Train (briefly), export, and run MoR-DASR on a real degraded photograph."""
    import numpy as np
    import torch

    from mordasr import metrics
    from mordasr.data.degradations import Degradation, degrade
    from mordasr.data.samples import load_sample_image
    from mordasr.errors import MordasrError
    from mordasr.export.buckets import default_buckets
    from mordasr.export.bundle import check_mode, default_mode, export_bundle
    from mordasr.model.io import base_path, load_checkpoint
    from mordasr.runtime import Restorer
    from mordasr.runtime.images import read_image, write_image
    from mordasr.training.adapter_trainer import AdapterTrainingConfig, train_adapters

    mode = mode or default_mode(adapter)
    try:
        check_mode(adapter, mode)
        base_dir = base_path(base)
    except MordasrError as err:
        raise click.UsageError(str(err)) from None

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    click.echo(f"[1/4] training {adapter} adapters on the {base} base for {steps} steps")
    model, base_meta = load_checkpoint(base_dir, adapter=adapter)
    trained = train_adapters(model, AdapterTrainingConfig(steps=steps, seed=seed),
                             out / "checkpoint", quiet=quiet)
    click.echo(f"      held-out crops: PSNR {trained['psnr']:.2f} dB (bicubic {trained['psnr_bicubic']:.2f} dB)")

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
    bicubic = metrics.bicubic_upsample(lr_read, manifest.scale)
    write_image(out / "bicubic.png", bicubic)

    names = [d["name"] for d in manifest.degradations]
    click.echo("      scores: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, result.scores))
               + (f" -> bucket {manifest.buckets[result.bucket].label}" if result.bucket is not None else ""))
    rows = [("bicubic upsampling", bicubic), (f"MoR-DASR {base} ({adapter}, {mode})", result.image)]
    teacher_image, teacher_note = _teacher_result(base_meta.get("distilled_from"), lr_read)
    if teacher_image is not None:
        write_image(out / "teacher.png", teacher_image)
        rows.append((f"teacher {base_meta['distilled_from']['name']}", teacher_image))
    click.echo("")
    wide = max(30, max(len(label) for label, _ in rows))
    header = f"{image} {w}x{h} from {lr.shape[1]}x{lr.shape[0]}"
    agreement = "   vs teacher PSNR (dB)" if teacher_image is not None else ""
    click.echo(f"{header:<{wide}}   PSNR (dB)   SSIM{agreement}")
    for label, restored in rows:
        psnr, ssim = _quality(restored, hr)
        agree = ""
        if teacher_image is not None and restored is not teacher_image:
            agree = f"   {_quality(restored, teacher_image)[0]:>20.2f}"
        click.echo(f"  {label:<{wide}} {psnr:7.2f}   {ssim:.4f}{agree}")
    if teacher_note:
        click.echo(teacher_note)
    click.echo(f"restore took {seconds:.2f} s; whole demo {time.perf_counter() - t0:.0f} s")
    images = ["lr.png", "bicubic.png", "restored.png"] + (["teacher.png"] if teacher_image is not None else [])
    click.echo("images: " + ", ".join(str(out / f) for f in images + ["hr.png"]))
    if not np.isfinite(result.image).all():
        sys.exit(1)


def _teacher_result(distilled_from: dict | None, lr):
    """(the teacher's restoration of ``lr`` or None, a note to print): a distilled base is compared
    with its teacher where that is installed; the note says how to install it otherwise."""
    if not distilled_from:
        return None, ""
    from mordasr.errors import MordasrError
    from mordasr.training.teachers import load_teacher

    try:
        teacher = load_teacher(distilled_from["name"])
    except MordasrError as err:
        return None, f"(no comparison with the teacher {distilled_from['name']}: {err})"
    return teacher.restore(lr), ""


if __name__ == "__main__":
    main()
