"""Accuracy report per bucket and precision against the FP32 PyTorch model.

For each bucket (folded: every evaluation image is forced through that bucket's graphs; gated:
routed by its scores) and each bundle precision: PSNR/SSIM of the restored image against the FP32
PyTorch output and against the ground-truth HR image, cosine similarity of the UNet output with
PyTorch's, and the max abs error of the image. Evaluation images are degraded crops of the
held-out photographs (never used for training or calibration).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mordasr import metrics
from mordasr.model import OneStepSR
from mordasr.runtime.manifest import GraphSpec
from mordasr.runtime.pipeline import Restorer


def evaluation_set(count: int, scale: int, crop: int = 128, seed: int = 1234):
    from mordasr.data.degradations import degraded_batch
    from mordasr.data.samples import CropSampler, sample_images

    rng = np.random.default_rng(seed)
    hr = CropSampler(sample_images("heldout"), crop, seed).sample(count)
    lr, _, _ = degraded_batch(hr, scale, rng)
    return list(lr), list(hr)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def accuracy_report(model: OneStepSR, bundles: dict[str, str | Path], eval_images: int = 4,
                    seed: int = 1234) -> list[dict]:
    """Rows of (bucket, precision, metrics) averaged over the evaluation images."""
    model.eval()
    unet_out: dict[str, np.ndarray] = {}

    def tap_for(precision: str):
        def tap(graph: GraphSpec, _feeds, output) -> None:
            if graph.component == "unet":
                unet_out[precision] = output
        return tap

    restorers = {p: Restorer(path, tap=tap_for(p)) for p, path in bundles.items()}
    first = next(iter(restorers.values()))
    buckets = list(range(len(first.centres))) if first.manifest.mode == "folded" else [None]
    lrs, hrs = evaluation_set(eval_images, first.scale, seed=seed)
    rows = []
    for bucket in buckets:
        sums: dict[str, dict[str, list[float]]] = {p: {} for p in restorers}
        for lr, hr in zip(lrs, hrs):
            results = {p: r.restore(lr, bucket=bucket) for p, r in restorers.items()}
            scores = next(iter(results.values())).scores
            route = first.centres[bucket] if bucket is not None else scores
            x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)[None]))
            with torch.no_grad(), model.routing.scores_for(
                    torch.from_numpy(np.asarray(route, np.float32)).reshape(1, -1)):
                z_l = model.encode(x)
                eps = model.denoise(z_l)
                reference = model.decode(model.schedule.x0(z_l, eps))[0].numpy().transpose(1, 2, 0)
            for p, res in results.items():
                row_metrics = {
                    "psnr_vs_fp32_torch": metrics.psnr(res.image, reference),
                    "ssim_vs_fp32_torch": metrics.ssim(res.image, reference),
                    "psnr_vs_hr": metrics.psnr(res.image, hr),
                    "ssim_vs_hr": metrics.ssim(res.image, hr),
                    "unet_cosine": _cosine(unet_out[p], eps.numpy()),
                    "max_abs_error": float(np.abs(res.image - reference).max()),
                    "finite": float(np.isfinite(res.image).all()),
                }
                for k, v in row_metrics.items():
                    sums[p].setdefault(k, []).append(v)
        for p, values in sums.items():
            label = first.manifest.buckets[bucket].label if bucket is not None else first.manifest.mode
            row = {"bucket": bucket, "label": label,
                   "precision": p, "images": len(lrs)}
            for k, v in values.items():
                reduce = {"max_abs_error": np.max, "finite": np.min}.get(k, np.mean)
                row[k] = float(reduce(v))
            rows.append(row)
    return rows


COLUMNS = (("psnr_vs_fp32_torch", "PSNR vs FP32 (dB)", "{:.2f}"), ("ssim_vs_fp32_torch", "SSIM vs FP32", "{:.4f}"),
           ("psnr_vs_hr", "PSNR vs HR (dB)", "{:.2f}"), ("ssim_vs_hr", "SSIM vs HR", "{:.4f}"),
           ("unet_cosine", "UNet cosine", "{:.5f}"), ("max_abs_error", "max abs err", "{:.4f}"))


def format_table(rows: list[dict]) -> str:
    header = "| bucket | precision | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [c[2].format(r[c[0]]) if np.isfinite(r[c[0]]) else "inf" for c in COLUMNS]
        lines.append(f"| {r['label']} | {r['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict], folder: str | Path, title: str, notes: list[str]) -> None:
    folder = Path(folder)
    (folder / "accuracy.json").write_text(json.dumps({"title": title, "rows": rows, "notes": notes}, indent=2) + "\n")
    md = [f"# {title}", "", format_table(rows), ""] + [f"- {n}" for n in notes]
    (folder / "accuracy.md").write_text("\n".join(md) + "\n")
