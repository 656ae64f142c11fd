"""``mordasr-eval``: score bundles and checkpoints on HR photographs, side by side with bicubic."""

from __future__ import annotations

from pathlib import Path

import click

from mordasr.benchmarks.recipes import MIXTURES, RECIPES, SEVERITIES, STANDARD, recipe_help
from mordasr.runtime.cli_options import backend_option, parse_list, threads_option, verbosity


def _recipes(text: str) -> list[str]:
    groups = {"standard": STANDARD, "severities": SEVERITIES, "mixtures": MIXTURES}
    names = parse_list(text, "--recipe", choices=(*groups, *RECIPES))
    expanded: list[str] = []
    for name in names:
        expanded += list(groups.get(name, (name,)))
    return list(dict.fromkeys(expanded))


@click.command("mordasr-eval", context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Recipes (LR = recipe(HR), seeded per image): " + recipe_help())
@click.argument("targets", nargs=-1, required=True)
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="Folder of HR photographs (recursive), e.g. a held-out set never trained on.")
@click.option("--recipe", "recipe_text", default="standard", show_default=True,
              help="Comma-separated recipe names, 'standard' (bicubic-x4, mixed-x4, realesrgan-x4), "
                   "'severities' (the noise/blur/JPEG grid) or 'mixtures' (two degradations at once).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("eval-out"), show_default=True,
              help="Folder for eval.json (per image and means) and eval.md (the table).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@backend_option
@threads_option()
@click.option("--lpips-weights", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Local state dict of lpips.LPIPS(net='vgg'): adds LPIPS (needs torch).")
@click.option("--save-images", is_flag=True, help="Also write every LR input and output under OUT/images/.")
@click.option("--grid", "grid_images", type=click.IntRange(min=1), default=None,
              help="Also write OUT/grid.png: a 192 px centre crop of the first N photographs as the LR input, "
                   "bicubic, every target, the teacher and HR, for the last recipe given.")
@click.option("--checkpoint-checks", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A base (or adapted) checkpoint: also report its autoencoder's reconstruction PSNR (RGB) "
                   "on every image, and the correlation of its estimator's blur/noise/compression scores "
                   "with the true strengths of seeded synthetic degradations of 256 px crops.")
@click.option("--teacher", default=None,
              help="A distillation teacher (realesrgan-x4plus, an .onnx or ncnn .param file, a bundle or "
                   "checkpoint): adds its own scores and, for every target, the Y-PSNR against its output "
                   "(agreement). Its outputs are cached (--teacher-cache).")
@click.option("--teacher-cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the teacher's outputs [default: $MORDASR_TEACHER_CACHE or "
                   "~/.cache/mordasr/teacher-outputs].")
@verbosity
def main(targets: tuple[str, ...], data: Path, recipe_text: str, out: Path, limit: int | None, backend: str,
         threads: int | None, lpips_weights: Path | None, save_images: bool, grid_images: int | None,
         checkpoint_checks: Path | None,
         teacher: str | None, teacher_cache: Path | None, quiet: bool) -> None:
    """Y-PSNR / Y-SSIM (BT.601, 4-pixel border), RGB PSNR and colour shift of each TARGET.

    \b
    TARGET: a bundle folder (run through the torch-free runtime, mordasr-run's defaults), a
    checkpoint folder (PyTorch; a base checkpoint runs without adapters), a shipped base by name
    (tiny, esrgan-student), or 'bicubic' (always included). Name one with LABEL=PATH.

    \b
    mordasr-eval bundles/mor base=runs/base --data val-hr/
    mordasr-eval tiny esrgan-student --teacher realesrgan-x4plus --data val-hr/
    """
    from tqdm import tqdm

    from mordasr.benchmarks.evaluate import evaluate, load_hr, markdown, resolve_target, write_results
    from mordasr.cli_errors import fail_on_errors

    with fail_on_errors("mordasr-eval"):
        recipes = _recipes(recipe_text)
        from mordasr.benchmarks.evaluate import teacher_target

        resolved = [resolve_target(t, backend, threads) for t in targets]
        taught = teacher_target(teacher, teacher_cache) if teacher else None
        images = load_hr(data, limit)
        bar = tqdm(total=len(images) * len(recipes), disable=quiet, desc="eval", dynamic_ncols=True)
        results = evaluate(resolved, images, recipes, lpips_weights, out / "images" if save_images else None,
                           progress=lambda _msg: bar.update(), teacher=taught)
        bar.close()
        results["data"] = str(data)
        if checkpoint_checks is not None:
            from mordasr.benchmarks.evaluate import autoencoder_psnr, router_correlations

            results["autoencoder"] = autoencoder_psnr(checkpoint_checks, images)
            results["router"] = router_correlations(checkpoint_checks, images)
        paths = write_results(results, out)
        if grid_images:
            from mordasr.benchmarks.grid import crop_grid

            paths.append(crop_grid(resolved, images[:grid_images], recipes[-1],
                                   out / "grid.png", teacher=taught))
    click.echo(markdown(results))
    click.echo("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
