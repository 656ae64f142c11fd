"""Calibrate an FP32 bundle to FP16 or INT8, evaluate it against FP32 PyTorch, and place it only
when it passes (``calibrate``): the library side of ``mordasr-calib`` and ``mordasr-export --fp16``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mordasr.errors import MordasrError

DEFAULT_CALIB_IMAGES = 32
DEFAULT_EVAL_IMAGES = 4


def calibrate(bundle: Path, out: Path, precision: str, *, checkpoint: Path | None, calib_images: int,
              calib_dir: Path | None, method: str, smoothquant: bool, keep_float: tuple[str, ...],
              min_psnr: float | None, eval_images: int, seed: int, force: bool, quiet: bool,
              components: dict[str, str] | None = None, fp32_fallback: tuple[str, ...] = (),
              report: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Build, evaluate and (if it passes) place the bundle at ``out``; return the report rows.

    A bundle that fails ``min_psnr`` (or produces non-finite images) is moved to ``OUT.failed``
    instead, and MordasrError is raised. ``report`` receives the accuracy table.
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
        report(format_table(rows))
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


def source_checkpoint(source: dict, bundle: Path) -> Path | None:
    """The checkpoint a bundle was exported from: beside the bundle as recorded relative to it,
    else at its absolute path (older bundles: relative to the directory the export ran in)."""
    relative = source.get("checkpoint_from_bundle")
    if relative and (Path(bundle) / relative / "config.json").is_file():
        return Path(bundle) / relative
    recorded = source.get("checkpoint")
    return Path(recorded) if recorded else None
