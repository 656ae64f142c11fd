"""A grid of crops for people to look at: the same region of held-out photographs as the LR input,
bicubic, every target, the teacher and HR, side by side at the output's size (LR upscaled by
nearest neighbour, so its pixels show)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mordasr import metrics
from mordasr.benchmarks.recipes import RECIPES, SCALE

LABEL_HEIGHT = 18


def centre_region(hr: np.ndarray, side: int) -> np.ndarray:
    side = min(side, hr.shape[0], hr.shape[1]) // SCALE * SCALE
    top, left = (hr.shape[0] - side) // 2 // SCALE * SCALE, (hr.shape[1] - side) // 2 // SCALE * SCALE
    return hr[top: top + side, left: left + side]


def crop_grid(targets, images: list[tuple[str, np.ndarray]], recipe: str, out: Path, side: int = 192,
              teacher=None) -> Path:
    """Write the grid PNG: one row per image, columns LR, bicubic, each target, the teacher, HR."""
    from PIL import Image, ImageDraw

    from mordasr.runtime.atomic import atomic_write

    rows, labels = [], []
    for name, hr in images:
        region = centre_region(hr, side)
        lr = RECIPES[recipe].degrade(region, name)
        columns = [("LR (input)", np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1)),
                   ("bicubic", metrics.bicubic_upsample(lr, SCALE))]
        columns += [(t.label, t.restore(lr)) for t in targets if t.kind != "bicubic"]
        if teacher is not None:
            columns.append((teacher.label, teacher.restore(lr)))
        columns.append(("HR", region))
        labels = [label for label, _ in columns]
        rows.append(np.concatenate([metrics.to_uint8(image[: region.shape[0], : region.shape[1]])
                                    for _, image in columns], axis=1))
    width = rows[0].shape[1]
    header = Image.new("RGB", (width, LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(header)
    cell = width // len(labels)
    for i, label in enumerate(labels):
        draw.text((i * cell + 4, 3), label, fill="black")
    grid = np.concatenate([np.asarray(header)] + rows, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, buffer.getvalue())
