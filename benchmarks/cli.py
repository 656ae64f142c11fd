"""``mordasr-bench``: MoR engines against dense-LoRA engines, with a report and plots."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from mordasr.benchmarks.runner import VARIANTS, BenchConfig
from mordasr.cli_errors import fail_on_errors
from mordasr.errors import MordasrError
from mordasr.runtime.cli_options import backend_option, parse_list, verbosity
from mordasr.runtime.trt_settings import PRECISIONS


@click.command("mordasr-bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["tiny", "sd21"]), default="tiny", show_default=True,
              help="tiny trains MoR and dense-LoRA adapters briefly on the CPU; sd21 uses random "
                   "weights (latency and memory only, labelled as such) unless checkpoints are given.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md, report.html, results.json and the PNG plots.")
@click.option("--variants", default=",".join(VARIANTS), show_default=True,
              help="Comma-separated variants: " + ", ".join(VARIANTS) + ".")
@click.option("--precisions", default="fp32", show_default=True, help="Comma-separated: fp32, fp16, int8.")
@backend_option
@click.option("--buckets", type=click.IntRange(min=1), default=4, show_default=True, help="Folded buckets.")
@click.option("--bucket-sweep", default="1,2,4,8,16", show_default=True,
              help="Bucket counts for the folded-vs-continuous fidelity curve.")
@click.option("--train-steps", type=click.IntRange(min=1), default=150, show_default=True,
              help="tiny: adapter training steps for each of MoR, dense LoRA and AdaptIR (same budget).")
@click.option("--mor-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Use this MoR checkpoint instead of training one.")
@click.option("--lora-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Use this dense-LoRA checkpoint instead of training one.")
@click.option("--adaptir-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Use this AdaptIR checkpoint instead of training one.")
@click.option("--iterations", type=click.IntRange(min=1), default=20, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed warm-up runs.")
@click.option("--rounds", type=click.IntRange(min=2), default=12, show_default=True,
              help="Interleaved rounds for the latency ratios (every variant timed in each round; the "
                   "ratio is reported with its 95 % interval).")
@click.option("--lr-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Low-resolution side of the timed and evaluated images, px.")
@click.option("--resolutions", default="32,64,128", show_default=True,
              help="LR sides for the latency-vs-resolution curve.")
@click.option("--eval-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="Held-out degraded photographs for fidelity.")
@click.option("--eval-data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="HR photographs never trained on (a held-out set): adds the Y-PSNR gain "
                   "over bicubic of every variant per recipe and per noise/blur/JPEG severity.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=8, show_default=True,
              help="How many of the --eval-data photographs to use.")
@click.option("--photo", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A photograph to restore with mordasr-run's defaults (tiling included) through the first "
                   "variant's bundle: seconds per output megapixel and peak RSS, in fresh processes.")
@click.option("--base", default="tiny", show_default=True,
              help="tiny preset: the base the adapters are trained on: a shipped base (tiny: the fidelity base; "
                   "esrgan-student: Real-ESRGAN x4plus distilled) or a base checkpoint folder.")
@click.option("--teacher", default=None,
              help="With --photo: also restore the photograph with this distillation teacher (e.g. "
                   "realesrgan-x4plus), alternating with the first variant's bundle in fresh processes, and "
                   "report both speeds and their ratio with a 95 % interval.")
@click.option("--peak-gflops", type=float, default=None,
              help="Device peak GFLOP/s, to report the achieved fraction per component.")
@click.option("--seed", type=int, default=0, show_default=True)
@verbosity
def main(preset, out_dir, variants, precisions, backend, buckets, bucket_sweep, train_steps, mor_checkpoint,
         lora_checkpoint, adaptir_checkpoint, iterations, warmup, rounds, lr_size, resolutions, eval_images,
         eval_data, eval_limit, photo, base, teacher, peak_gflops, seed, quiet):
    """Benchmark MoR (folded, gated, hybrid) against merged dense LoRA, AdaptIR and PyTorch eager.

    Measures, in one run on this machine: latency p50/p95/p99 per component and end to end,
    throughput, runtime overhead over raw session time, peak host RSS, size on disk, export
    time, FLOPs per component, PSNR/SSIM against FP32 PyTorch and against the HR image, and the
    folded-vs-continuous routing gap per bucket count.
    """
    from tqdm import tqdm

    from mordasr.benchmarks.report import write_report
    from mordasr.benchmarks.runner import run_benchmark

    with fail_on_errors("mordasr-bench"):
        cfg = BenchConfig(preset=preset, variants=parse_list(variants, "--variants", choices=VARIANTS),
                          precisions=parse_list(precisions, "--precisions", choices=PRECISIONS), backend=backend,
                          buckets=buckets, train_steps=train_steps, iterations=iterations, warmup=warmup,
                          rounds=rounds, lr_size=lr_size, eval_images=eval_images, peak_gflops=peak_gflops, seed=seed,
                          mor_checkpoint=mor_checkpoint, lora_checkpoint=lora_checkpoint,
                          adaptir_checkpoint=adaptir_checkpoint, eval_data=eval_data, eval_limit=eval_limit,
                          photo=photo, base=base, teacher=teacher,
                          bucket_sweep=parse_list(bucket_sweep, "--bucket-sweep", int),
                          resolutions=parse_list(resolutions, "--resolutions", int))
        cfg.validate()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MordasrError(f"cannot write to {out_dir}: {err.strerror or err}") from None
        if not os.access(out_dir, os.W_OK):
            raise MordasrError(f"{out_dir} is not writable")
    with tempfile.TemporaryDirectory(prefix=".bench.", dir=out_dir) as work, \
            tqdm(desc="bench", unit="step", disable=quiet, file=sys.stderr) as bar:
        def progress(message: str) -> None:
            bar.set_postfix_str(message)
            bar.update(1)

        with fail_on_errors("mordasr-bench"):
            results = run_benchmark(cfg, Path(work), progress)
    files = write_report(results, out_dir)
    if not quiet:
        click.echo((out_dir / "report.md").read_text())
        click.echo("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
