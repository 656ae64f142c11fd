"""``mordasr-study``: the controlled MoR vs dense LoRA study (benchmarks/study.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from mordasr.benchmarks.study import ABLATIONS
from mordasr.cli_errors import fail_on_errors
from mordasr.runtime.cli_options import parse_list, verbosity


@click.command("mordasr-study", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, report.html, results.json, heatmap.png and buckets.png.")
@click.option("--work", type=click.Path(path_type=Path), required=True,
              help="Folder for the base, the adapter runs, the bundles and the evaluation cache; a second run "
                   "of the same command reuses everything there (a killed study resumes).")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="HR photographs to train on (the base and every adapter run).")
@click.option("--eval-data", type=click.Path(path_type=Path), required=True,
              help="Held-out HR photographs, never trained on.")
@click.option("--eval-limit", type=click.IntRange(min=2), default=24, show_default=True,
              help="How many --eval-data photographs (centre crops) to measure on.")
@click.option("--eval-crop", type=click.IntRange(min=32), default=256, show_default=True,
              help="HR side of each held-out centre crop, px.")
@click.option("--base-vae-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Base: autoencoder steps (reconstruction only: forgets restoration).")
@click.option("--base-sr-steps", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Base: steps of the new UNet on clean bicubic inputs only.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Adapter steps, the same for every kind and seed.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds of every adapter kind.")
@click.option("--adapters", default="mor,lora,adaptir", show_default=True,
              help="Comma-separated adapter kinds (mor and lora at least).")
@click.option("--ablations", default=",".join(ABLATIONS), show_default=True,
              help="Comma-separated MoR ablations, each trained on the first seed: "
                   + "; ".join(f"{name}: {change}" for name, (change, _) in ABLATIONS.items())
                   + ". An empty string trains none.")
@click.option("--confirm", default=None,
              help="One of the --ablations to train on every seed too and compare with LoRA like MoR (for an "
                   "ablation that beat both on the first seed).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Adapter crops per step.")
@click.option("--crop", type=click.IntRange(min=16), default=64, show_default=True, help="Adapter HR crop side, px.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Adapter training precision (bf16: autocast on the CPU).")
@click.option("--rounds", type=click.IntRange(min=2), default=12, show_default=True,
              help="Interleaved rounds for the latency ratios.")
@verbosity
def main(out_dir: Path, work: Path, data: Path, eval_data: Path, eval_limit: int, eval_crop: int,
         base_vae_steps: int, base_sr_steps: int, steps: int, seeds: str, adapters: str, ablations: str,
         confirm: str | None, batch: int, crop: int, precision: str, rounds: int, quiet: bool) -> None:
    """MoR against dense LoRA (and AdaptIR) on a base trained on clean inputs only: per family
    and severity with 95 % intervals over images x seeds, a routing heatmap, the bucket-count
    curve and the latency ratios. Hours on 2 CPU cores; resumable.

    \b
      mordasr-study --out benchmarks/results/mor-study --work runs/study \\
          --data train-hr/ --eval-data val-hr/
    """
    from mordasr.benchmarks.study import StudyConfig, run_study, write_report

    command = "mordasr-study " + shlex.join(sys.argv[1:])
    with fail_on_errors("mordasr-study"):
        cfg = StudyConfig(out=out_dir, work=work, data=data, eval_data=eval_data, eval_limit=eval_limit,
                          eval_crop=eval_crop, base_vae_steps=base_vae_steps, base_sr_steps=base_sr_steps,
                          steps=steps, seeds=parse_list(seeds, "--seeds", int),
                          adapters=parse_list(adapters, "--adapters", choices=("mor", "lora", "adaptir")),
                          ablations=(parse_list(ablations, "--ablations", choices=tuple(ABLATIONS))
                                     if ablations else ()), confirm=confirm,
                          batch=batch, crop=crop, precision=precision, rounds=rounds)
        results = run_study(cfg, progress=(lambda _m: None) if quiet else
                            (lambda m: click.echo(f"study: {m}", err=True)))
        files = write_report(results, out_dir, command)
    if not quiet:
        click.echo(files[0].read_text())


if __name__ == "__main__":
    main()
