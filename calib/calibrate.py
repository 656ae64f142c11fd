"""Calibrate an FP32 bundle to FP16 or INT8, evaluate it against FP32 PyTorch, and place it only
when it passes (``calibrate``): the library side of ``mordasr-calib`` and ``mordasr-export --fp16``."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from mordasr.calib.gate import Gate
from mordasr.calib.report import accuracy_report, format_table, write_report
from mordasr.errors import AccuracyGateFailed, MordasrError

DEFAULT_CALIB_IMAGES = 32
DEFAULT_EVAL_IMAGES = 4
DEFAULT_MIN_PER_BUCKET = 16  # calibration images every bucket's graphs see, routed or forced through it


def calibrate(bundle: Path, out: Path, precision: str, *, checkpoint: Path | None, calib_images: int,
              calib_dir: Path | None, method: str, smoothquant: bool, keep_float: tuple[str, ...],
              gate: Gate = Gate(), eval_images: int, seed: int, force: bool, quiet: bool,
              components: dict[str, str] | None = None, fp32_fallback: tuple[str, ...] = (),
              min_per_bucket: int = DEFAULT_MIN_PER_BUCKET, mixed_precision: bool = True,
              failed_to: Path | None = None, report: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Build, evaluate and (if every bucket passes ``gate``) place the bundle at ``out``; return
    the report rows.

    INT8: each bucket calibrates on at least ``min_per_bucket`` images (its nearest, routed to it
    or forced through it); fewer calibration images than that are refused before anything is
    written. A bucket that fails the gate gets its most sensitive layers kept float, more of them
    until it passes (``mixed_precision``, ``calib/mixed_precision.py``). A bundle that still fails
    is moved to ``failed_to`` (default ``OUT.failed``) and AccuracyGateFailed is raised. ``report``
    receives the accuracy table and the progress of mixed precision.
    """
    from tqdm import tqdm

    from mordasr.calib.data import folder_images, synthetic_images
    from mordasr.calib.precision_bundle import bundle_precision, component_precisions, load_fp32_manifest
    from mordasr.model.io import load_checkpoint

    if out.exists() and not force:
        raise MordasrError(f"{out} already exists (pass --force to replace it)")
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
        if calib_images < min_per_bucket:
            raise MordasrError(f"INT8 calibration needs at least {min_per_bucket} images (each bucket calibrates on "
                               f"{min_per_bucket}, routed or forced through it); --calib-images {calib_images} is "
                               "too few")
        if calib_dir is not None:
            images, source = folder_images(calib_dir, calib_images, seed), str(calib_dir)
            _check_sizes(images, manifest, calib_dir)
        else:
            images = synthetic_images(calib_images, manifest.scale, seed=seed)
    per_bucket = max(min_per_bucket, len(images) // len(manifest.buckets)) if images is not None else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    ranges = Path(tempfile.mkdtemp(prefix=f".{out.name}.ranges.", dir=out.parent))
    build = dict(images=images, per_bucket=per_bucket, method=method, smoothquant=smoothquant, keep_float=keep_float,
                 source=source, seed=seed, components=chosen, fp32_fallback=fp32_fallback, ranges_dir=ranges)
    try:
        converted = sum(chosen.get(g.component, "fp32") != "fp32" for g in manifest.graphs)
        with tqdm(total=converted, desc=label, unit="graph", disable=quiet, file=sys.stderr) as bar:
            _build(bundle, stage, precision, build, on_graph=lambda _: bar.update(1))
        rows = accuracy_report(model, {"fp32": bundle, label: stage}, eval_images)
        mixed: dict = {}
        if gate.failures(rows, label) and "int8" in chosen.values() and mixed_precision:
            rows, mixed = _keep_sensitive_layers_float(bundle, stage, precision, build, rows, model, gate, label,
                                                       eval_images, report)
        failures = gate.failures(rows, label)
        notes = [f"FP32 reference: PyTorch checkpoint {checkpoint}",
                 f"evaluation: {eval_images} degraded crops of held-out photographs per bucket "
                 "(folded bundles force every image through each bucket)",
                 "router graph stays FP32 in every precision",
                 "components: " + ", ".join(f"{c} {p}" for c, p in chosen.items()),
                 f"gate: every bucket at least {gate.min_psnr:g} dB from FP32, and at most {gate.max_hr_loss:g} dB "
                 "below FP32 against HR"]
        notes += [f"kept float in {key} (most sensitive first): {', '.join(info['float_layers'])}; "
                  f"this graph takes {info['latency_ratio']:.2f}x the all-INT8 graph's time on this CPU"
                  for key, info in mixed.items()]
        notes += [f"FAILED {reason}" for reason in failures]
        _record(stage, gate, mixed, failures)
        write_report(rows, stage, f"Accuracy of the {label} {manifest.mode} bundle", notes)
        report(format_table(rows))
        stage.chmod(0o755)
        if failures:
            failed = failed_to or out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            stage.rename(failed)
            raise AccuracyGateFailed(f"{label} bundle failed the accuracy gate ({failures[0]}"
                               f"{f'; {len(failures) - 1} more' if len(failures) > 1 else ''}); kept at {failed}, "
                               f"not at {out}")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(ranges, ignore_errors=True)
    return rows


def _build(bundle: Path, stage: Path, precision: str, build: dict, on_graph=None,
           float_layers: dict[str, list[str]] | None = None) -> None:
    from mordasr.calib.precision_bundle import build_precision_bundle

    for child in stage.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    build_precision_bundle(bundle, stage, precision, on_graph=on_graph, float_layers=float_layers, **build)


def _keep_sensitive_layers_float(bundle: Path, stage: Path, precision: str, build: dict, rows: list[dict], model,
                                 gate: Gate, label: str, eval_images: int, report) -> tuple[list[dict], dict]:
    """Rank the failing buckets' INT8 layers by sensitivity and keep the top 1, 2, 4, ... float
    until every bucket passes (or every ranked layer is float); returns (rows, {graph key: info})."""
    from mordasr.calib.mixed_precision import latency_ratio, plan_float_layers, rank_failing_buckets
    from mordasr.calib.report import evaluation_set
    from mordasr.runtime.manifest import load_manifest

    manifest = load_manifest(stage)
    images = evaluation_set(eval_images, manifest.scale)[0]
    failing = gate.failing_buckets(rows, label)
    with tempfile.TemporaryDirectory(prefix="mordasr-int8-all.") as keep:
        all_int8 = Path(keep)
        for g in manifest.primary_graphs:
            shutil.copy2(stage / g.file, all_int8 / Path(g.file).name)
        ranked, scores = rank_failing_buckets(bundle, stage, build["ranges_dir"], failing, images,
                                              method=build["method"], keep_float=build["keep_float"])
        components = {g.key: g.component for g in manifest.primary_graphs if g.precision == "int8"}
        longest = max((len(layers) for layers in ranked.values()), default=0)
        count, float_layers = 1, {}
        while count <= longest:
            float_layers = plan_float_layers(ranked, count, components, bool(manifest.weight_packs))
            _build(bundle, stage, precision, build, float_layers=float_layers)
            rows = accuracy_report(model, {"fp32": bundle, label: stage}, eval_images)
            failures = gate.failures(rows, label)
            report(f"mixed precision: {count} most sensitive layer(s) of each failing graph kept float: "
                   + (failures[0] if failures else "passes"))
            if not failures:
                break
            count *= 2
        feeds = _first_feeds(bundle, images)
        mixed = {key: {"float_layers": layers, "sensitivity": {n: scores.get(key, {}).get(n) for n in layers},
                       "latency_ratio": latency_ratio(stage / _file(manifest, key),
                                                      all_int8 / Path(_file(manifest, key)).name,
                                                      feeds[key]) if key in feeds else float("nan")}
                 for key, layers in float_layers.items()}
    return rows, mixed


def _file(manifest, key: str) -> str:
    return next(g.file for g in manifest.primary_graphs if g.key == key)


def _first_feeds(bundle: Path, images) -> dict[str, list[dict]]:
    from mordasr.calib.mixed_precision import bucket_feeds
    from mordasr.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    feeds: dict[str, list[dict]] = {}
    for bucket in (range(len(manifest.buckets)) if manifest.mode == "folded" else [None]):
        for key, found in bucket_feeds(bundle, images[:1], bucket).items():
            feeds.setdefault(key, found)
    return feeds


def _record(stage: Path, gate: Gate, mixed: dict, failures: list[str]) -> None:
    """The gate, the layers kept float and their cost, in the bundle's manifest."""
    from dataclasses import asdict, replace

    from mordasr.runtime.manifest import load_manifest

    manifest = load_manifest(stage, verify_hashes=False)
    calibration = dict(manifest.calibration, gate=asdict(gate), gate_failures=failures,
                       mixed_precision={k: {"float_layers": v["float_layers"], "latency_ratio": v["latency_ratio"]}
                                        for k, v in mixed.items()})
    replace(manifest, calibration=calibration).write(stage)


def _check_sizes(images, manifest, folder: Path) -> None:
    """Calibration images smaller than the bundle's smallest profile run nowhere the bundle runs."""
    if not manifest.profile:
        return
    h, w = (side // manifest.scale for side in manifest.profile["min"])
    small = [i for i, image in enumerate(images) if image.shape[0] < h or image.shape[1] < w]
    if small:
        raise MordasrError(f"calibration folder {folder}: {len(small)} of {len(images)} images are smaller than the "
                           f"bundle's smallest input ({w}x{h} LR px, its --min-size / scale); give larger images")


def source_checkpoint(source: dict, bundle: Path) -> Path | None:
    """The checkpoint a bundle was exported from: beside the bundle as recorded relative to it,
    else at its absolute path (older bundles: relative to the directory the export ran in)."""
    relative = source.get("checkpoint_from_bundle")
    if relative and (Path(bundle) / relative / "config.json").is_file():
        return Path(bundle) / relative
    recorded = source.get("checkpoint")
    return Path(recorded) if recorded else None
