"""``mordasr-import``: turn an OSEDiff or peft/diffusers LoRA checkpoint into a mordasr checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from mordasr.cli_errors import fail_on_errors, failer
from mordasr.runtime.cli_options import verbosity

_fail = failer("mordasr-import")

PROMPT_NOTE = ("OSEDiff tags each input with a RAM model and feeds the tag prompt to its UNet; the exported "
               "UNet takes no text input, so one prompt's embedding (--prompt, empty by default) is computed "
               "once with the base folder's text encoder and baked into every graph: the same conditioning "
               "for every image, no tagging model at run time.")


def _common(command):
    options = [
        click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
                     help="mordasr checkpoint folder to write (config.json, model.safetensors)."),
        click.option("--sd-weights", "sd_dir", required=True,
                     type=click.Path(path_type=Path, exists=True, file_okay=False),
                     help="Local diffusers folder of the base the LoRA was trained on (SD 2.1-base or "
                          "SD-Turbo: vae/, unet/, text_encoder/, tokenizer/)."),
        click.option("--clip-weights", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     help="Local open_clip checkpoint for the degradation estimator (ViT-B-16). In dense-lora "
                          "mode it routes nothing; the runtime reports its scores."),
        click.option("--clip-model-name", default=None,
                     help="open_clip architecture of --clip-weights [default: ViT-B-16]."),
        click.option("--prompt", default="", show_default=True,
                     help="Text whose embedding is baked into the UNet (see below)."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
    ]
    for option in reversed(options):
        command = option(command)
    return verbosity(command)


@click.group("mordasr-import", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Import a one-step SR model trained elsewhere, so it deploys without retraining.

    \b
    mordasr-import osediff CKPT.pkl --sd-weights SD_DIR --clip-weights CLIP.bin -o runs/osediff
    mordasr-import peft UNET_LORA_DIR [VAE_LORA_DIR] --sd-weights SD_DIR --clip-weights CLIP.bin -o runs/mine

    The result is a mordasr checkpoint with dense LoRA adapters on the sd21 preset: export it with
    mordasr-export CKPT --mode dense-lora (the adapters are merged into the weights), calibrate
    and run it like any other. The latent is the encoder's mean (OSEDiff's code samples it).

    \b
    Text conditioning: OSEDiff tags each input with a RAM model and feeds the tag prompt to its
    UNet. The exported UNet takes no text input: the embedding of --prompt (empty by default) is
    computed once with SD_DIR's text encoder and baked in, the same for every image, and is
    recorded in the checkpoint and the bundle's manifest. Images whose content OSEDiff's tags
    would have described restore with the generic prompt instead.
    """


def _write(lora, out: Path, sd_dir: Path, clip_weights: Path, clip_model_name: str | None, prompt: str,
           force: bool, quiet: bool) -> None:
    from mordasr.model.importers.lora_weights import build_imported_model
    from mordasr.model.io import save_checkpoint

    if out.exists() and not force:
        _fail(f"{out} already exists (pass --force to replace it)")
    with fail_on_errors("mordasr-import"):
        model = build_imported_model(lora, sd_dir, clip_weights, clip_model_name, prompt)
    meta = {"kind": "imported", "random_weights": False, "imported": lora.source,
            "base": str(sd_dir.resolve()), "text_conditioning": {"prompt": prompt, "note": PROMPT_NOTE}}
    save_checkpoint(model, out, meta)
    if not quiet:
        modules = lora.modules()
        click.echo(f"wrote {out}: dense LoRA on {len(lora.unet)} UNet and {len(lora.vae)} VAE-encoder layers "
                   f"(ranks {sorted({w.rank for w in modules.values()})}, scaling "
                   f"{sorted({round(w.alpha / w.rank, 6) for w in modules.values()})}"
                   + (f", {', '.join(lora.replaced)} replaced" if lora.replaced else "")
                   + f"); prompt {prompt!r} baked in. Next: mordasr-export {out} --mode dense-lora -o BUNDLE")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@_common
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=None,
              help="LoRA alpha the checkpoint was trained with [default: 8, peft's default, which OSEDiff "
                   "uses]; scaling = alpha / rank.")
def osediff(checkpoint: Path, out: Path, sd_dir: Path, clip_weights: Path, clip_model_name: str | None,
            prompt: str, force: bool, quiet: bool, lora_alpha: float | None) -> None:
    """An OSEDiff checkpoint (torch.save of rank_unet, rank_vae, the module lists, state_dict_unet and
    state_dict_vae, as OSEDiff's training code writes it).

    Read with torch.load(weights_only=True): a file holding pickled code is refused."""
    from mordasr.model.importers.osediff import read_osediff

    with fail_on_errors("mordasr-import"):
        lora = read_osediff(checkpoint, lora_alpha)
    _write(lora, out, sd_dir, clip_weights, clip_model_name, prompt, force, quiet)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_common
def peft(paths: tuple[Path, ...], out: Path, sd_dir: Path, clip_weights: Path, clip_model_name: str | None,
         prompt: str, force: bool, quiet: bool) -> None:
    """LoRA weights saved by peft (a folder with adapter_model.safetensors and adapter_config.json)
    or by diffusers (pytorch_lora_weights.safetensors), for the UNet and/or the VAE encoder; give
    one path per file.

    Scaling: lora_alpha / r from adapter_config.json or diffusers' metadata (rank_pattern,
    alpha_pattern and use_rslora honoured); a diffusers file without either uses alpha = rank, as
    diffusers' loader does."""
    from mordasr.model.importers.peft_files import read_peft

    with fail_on_errors("mordasr-import"):
        lora = read_peft(list(paths))
    _write(lora, out, sd_dir, clip_weights, clip_model_name, prompt, force, quiet)


if __name__ == "__main__":
    main()
