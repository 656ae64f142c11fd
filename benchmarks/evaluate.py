"""Score restorers on a folder of HR photographs under named degradation recipes, beside bicubic.

A target is ``bicubic`` (PIL's bicubic upsampling of the 8-bit LR image), a bundle (a folder with
``manifest.json``, run through the torch-free runtime with ``mordasr-run``'s defaults), a
checkpoint (a folder with ``config.json``, run through PyTorch; a base checkpoint runs without
adapters) or a shipped base by name (``tiny``, ``esrgan-student``). Every target sees the same LR
images (``benchmarks/recipes.py``); each output is scored as an 8-bit image
(``mordasr/metrics.py``). With a teacher (``training/teachers.py``), the teacher's own scores
are reported too, and every target's agreement with it: the Y-PSNR of its output against the
teacher's (``agree_y``); the teacher's outputs are kept in the teacher cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mordasr import metrics
from mordasr.benchmarks.recipes import RECIPES, SCALE, mod_crop
from mordasr.errors import MordasrError

log = logging.getLogger(__name__)

Restore = Callable[[np.ndarray], np.ndarray]  # LR (h, w, 3) in [0, 1] -> (h*4, w*4, 3)


@dataclass
class Target:
    label: str
    kind: str  # bicubic | bundle | checkpoint
    path: Path | None = None
    restore: Restore | None = field(default=None, repr=False)


def _bundle_restore(path: Path, backend: str, threads: int | None) -> Restore:
    from mordasr.runtime import Restorer

    options = {"threads": threads} if threads else {}
    restorer = Restorer(path, backend=backend, **options)
    return lambda lr: restorer.restore(lr).image


def _checkpoint_restore(path: Path) -> Restore:
    import torch

    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(path, add_adapters=False)
    from mordasr.export.graphs import lr_multiple

    m = lr_multiple(model)

    @torch.no_grad()
    def restore(lr: np.ndarray) -> np.ndarray:
        h, w = lr.shape[:2]
        pad = ((0, (-h) % m), (0, (-w) % m), (0, 0))
        x = torch.from_numpy(np.pad(lr, pad, mode="reflect").transpose(2, 0, 1)[None].copy())
        out = model(x)[0].numpy().transpose(1, 2, 0)
        return out[: h * model.config.scale, : w * model.config.scale]

    return restore


def resolve_target(spec: str, backend: str = "onnxruntime", threads: int | None = None) -> Target:
    """``bicubic``, a shipped base's name, ``PATH`` or ``LABEL=PATH`` (a bundle or a checkpoint folder)."""
    from mordasr.model.io import SHIPPED_BASES, base_path

    if spec == "bicubic":
        return Target("bicubic", "bicubic", None, lambda lr: metrics.bicubic_upsample(lr, SCALE))
    label, _, path_text = spec.rpartition("=")
    named = path_text in SHIPPED_BASES and not Path(path_text).exists()
    path = base_path(path_text) if named else Path(path_text)
    label = label or (path_text if named else path.name)
    if (path / "manifest.json").is_file():
        return Target(label, "bundle", path, _bundle_restore(path, backend, threads))
    if (path / "config.json").is_file():
        return Target(label, "checkpoint", path, _checkpoint_restore(path))
    raise MordasrError(f"{path}: neither a bundle (manifest.json) nor a checkpoint (config.json)")


def load_hr(folder: Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    from mordasr.data.folders import image_files
    from mordasr.runtime.images import read_image

    files = image_files(folder)
    if not files:
        raise MordasrError(f"{folder} holds no images")
    files = files[:limit] if limit else files
    return [(f.stem, mod_crop(read_image(f), SCALE)) for f in files]


def teacher_target(spec: str, cache: Path | None = None) -> Target:
    """A teacher as an evaluation target whose outputs are kept in the teacher cache (keyed by the
    teacher's files, the recipe and the LR image's bytes), so a second evaluation does not rerun it."""
    import hashlib

    from mordasr.training.teacher_cache import TeacherCache
    from mordasr.training.teachers import load_teacher

    teacher = load_teacher(spec)
    store, fingerprint = TeacherCache(cache), teacher.fingerprint()

    def restore(lr: np.ndarray) -> np.ndarray:
        image = metrics.to_uint8(lr)
        key = hashlib.sha256(f"eval:{fingerprint}:{image.shape}".encode() + image.tobytes()).hexdigest()
        if store.has(key):
            return store.load(key, with_hr=False)["teacher"].astype(np.float32) / 255
        out = metrics.to_uint8(teacher.restore(image))
        store.store(key, image, out, np.zeros((0, 0, 3), np.uint8))
        return out.astype(np.float32) / 255

    return Target(f"teacher {teacher.name}", "teacher", None, restore)


def evaluate(targets: list[Target], images: list[tuple[str, np.ndarray]], recipe_names: list[str],
             lpips_weights: Path | None = None, save_images: Path | None = None,
             progress: Callable[[str], None] | None = None, teacher: Target | None = None) -> dict:
    """Per-image and mean metrics of every target on every recipe; deltas against bicubic; with a
    ``teacher``, its own row and every target's agreement with it (``agree_y``)."""
    lpips = _lpips(lpips_weights) if lpips_weights else None
    if not any(t.kind == "bicubic" for t in targets):
        targets = [resolve_target("bicubic")] + targets
    if teacher is not None:
        targets = targets + [teacher]
    per_image: list[dict] = []
    for recipe_name in recipe_names:
        recipe = RECIPES[recipe_name]
        for name, hr in images:
            lr = recipe.degrade(hr, name)
            if save_images:
                _save(save_images / recipe_name / f"{name}_lr.png", lr)
            taught = teacher.restore(lr) if teacher is not None else None
            for target in targets:
                out = taught if target is teacher else target.restore(lr)
                row = {"recipe": recipe_name, "image": name, "target": target.label,
                       **metrics.score(out, hr, border=SCALE)}
                if taught is not None and target is not teacher:
                    row["agree_y"] = metrics.psnr_y(out, taught, border=SCALE)
                if lpips is not None:
                    row["lpips"] = lpips(out, hr)
                per_image.append(row)
                if save_images:
                    _save(save_images / recipe_name / f"{name}_{target.label}.png", out)
            if progress:
                progress(f"{recipe_name} {name}")
    return {"targets": [{"label": t.label, "kind": t.kind, "path": str(t.path) if t.path else None}
                        for t in targets],
            "recipes": {r: RECIPES[r].description for r in recipe_names},
            "images": [name for name, _ in images], "per_image": per_image,
            "summary": summarise(per_image)}


def summarise(per_image: list[dict]) -> list[dict]:
    """Means per (recipe, target), with the mean and worst per-image Y-PSNR gain over bicubic."""
    bicubic = {(r["recipe"], r["image"]): r["psnr_y"] for r in per_image if r["target"] == "bicubic"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in per_image:
        groups.setdefault((row["recipe"], row["target"]), []).append(row)
    summary = []
    for (recipe, target), rows in groups.items():
        entry = {"recipe": recipe, "target": target, "images": len(rows)}
        for key in ("psnr_y", "ssim_y", "psnr_rgb", "colour_shift", "lpips", "agree_y"):
            if key in rows[0]:
                entry[key] = float(np.mean([r[key] for r in rows]))
        gains = [r["psnr_y"] - bicubic[(recipe, r["image"])] for r in rows]
        entry["gain_y"] = float(np.mean(gains))
        entry["worst_gain_y"] = float(np.min(gains))
        entry["worst_image"] = rows[int(np.argmin(gains))]["image"]
        summary.append(entry)
    return summary


def markdown(results: dict) -> str:
    has_lpips = any("lpips" in s for s in results["summary"])
    has_teacher = any("agree_y" in s for s in results["summary"])
    lines = [f"Images: {len(results['images'])}; metrics on 8-bit outputs, Y = BT.601 studio range, "
             f"{SCALE}-pixel border cropped. Gain = Y-PSNR minus bicubic's on the same image."
             + (" vs teacher = Y-PSNR against the teacher's output (agreement)." if has_teacher else ""), ""]
    head = ("| recipe | target | Y-PSNR (dB) | gain (dB) | worst image gain (dB) | Y-SSIM | RGB PSNR (dB) "
            "| colour shift (ΔE00) |")
    head += " vs teacher Y-PSNR (dB) |" if has_teacher else ""
    lines += [head + (" LPIPS |" if has_lpips else ""), "|---" * (8 + has_teacher + has_lpips) + "|"]
    for s in results["summary"]:
        row = (f"| {s['recipe']} | {s['target']} | {s['psnr_y']:.2f} | {s['gain_y']:+.2f} | "
               f"{s['worst_gain_y']:+.2f} ({s['worst_image']}) | {s['ssim_y']:.4f} | {s['psnr_rgb']:.2f} | "
               f"{s['colour_shift']:.2f} |")
        if has_teacher:
            row += f" {s['agree_y']:.2f} |" if "agree_y" in s else " (the teacher) |"
        lines.append(row + (f" {s['lpips']:.4f} |" if has_lpips else ""))
    lines += ["", "Recipes: " + "; ".join(f"`{k}`: {v}" for k, v in results["recipes"].items())]
    if "autoencoder" in results:
        a = results["autoencoder"]
        lines += ["", f"Autoencoder reconstruction (RGB PSNR, {len(a['per_image'])} images): mean "
                      f"{a['mean_psnr_rgb']:.2f} dB, lowest {a['min_psnr_rgb']:.2f} dB."]
    if "router" in results:
        r = results["router"]
        pairs = [f"{d} vs {r[d]['vs']} r = {r[d]['pearson']:.2f}" for d in ("blur", "noise", "compression")]
        lines += ["", f"Estimator scores vs true degradation strength ({r['samples']} crops of {r['crop']} px): "
                  + ", ".join(pairs) + "."]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> list[Path]:
    from mordasr.runtime.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval.json", out / "eval.md"
    atomic_write(json_path, (json.dumps(results, indent=2) + "\n").encode())
    atomic_write(md_path, markdown(results).encode())
    return [json_path, md_path]


def _save(path: Path, image: np.ndarray) -> None:
    from mordasr.runtime.images import write_image

    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, image)


def _lpips(weights: Path) -> Callable[[np.ndarray, np.ndarray], float]:
    import torch

    from mordasr.training.perceptual import LPIPS

    model = LPIPS.from_file(weights)

    @torch.no_grad()
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        ta, tb = (torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32))
                  for x in (metrics.to_uint8(a) / 255.0, metrics.to_uint8(b) / 255.0))
        return float(model(ta, tb)[0])

    return distance


def autoencoder_psnr(checkpoint: Path, images: list[tuple[str, np.ndarray]]) -> dict:
    """RGB PSNR of Dec(Enc(HR)) through the latent mean, per image and mean: the ceiling of
    everything the one-step path can restore."""
    import torch

    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    m = 2 ** (len(model.config.vae["block_out_channels"]) - 1)
    per_image = {}
    with torch.no_grad():
        for name, hr in images:
            hr = mod_crop(hr, m)
            x = torch.from_numpy(hr.transpose(2, 0, 1)[None].copy()) * 2 - 1
            moments = model.vae.quant_conv(model.vae.encoder(x))[:, : model.config.latent_channels]
            out = ((model.vae.decode(moments).sample + 1) / 2)[0].numpy().transpose(1, 2, 0)
            per_image[name] = metrics.psnr_rgb(out, hr)
    return {"checkpoint": str(checkpoint), "per_image": per_image,
            "mean_psnr_rgb": float(np.mean(list(per_image.values()))), "min_psnr_rgb": float(min(per_image.values()))}


def router_correlations(checkpoint: Path, images: list[tuple[str, np.ndarray]], crops_per_image: int = 8,
                        crop: int = 256, seed: int = 0) -> dict:
    """The checkpoint's estimator scored against seeded synthetic degradations of HR crops
    (``mordasr.training.common.estimator_correlations``)."""
    from mordasr.model.io import load_checkpoint
    from mordasr.training.common import estimator_correlations

    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    return estimator_correlations(model, [hr for _, hr in images], crops_per_image, crop, seed)
