"""Overlapping tiles and seam-free blending, for inputs larger than a graph's profile.

A function maps an input (N, C, H, W) to an output whose sides are ``factor`` times the input's
(the whole restore: the scale). ``tiled_apply`` runs it on overlapping input tiles whose origins
and sizes are multiples of ``multiple``, weights every output tile with a smooth window (Gaussian,
or linear ramps) and divides by the summed weights, so overlaps blend without seams and an
identity function reproduces its input. Working memory is one tile's run plus one float32
accumulator of the output's size (12 bytes per output pixel for RGB): linear in pixels. The
windows are separable and the tiles a full grid, so the summed weights are the outer product of
two vectors and need no buffer of the output's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

WINDOWS = ("gaussian", "linear")


@dataclass(frozen=True, kw_only=True)
class Tiling:
    """How the runtime cuts an image too large for its graphs (``mordasr-run --tile*``)."""

    tile: int | None = None  # LR tile side; None: the bundle profile's largest output / scale; 0: never tile
    overlap: int | None = None  # LR pixels shared by neighbouring tiles; None: tile / 4
    per_tile_routing: bool = False  # score each tile instead of the whole image
    window: str = "gaussian"  # blending weights across overlaps: gaussian | linear

    def __post_init__(self) -> None:
        if self.window not in WINDOWS:
            raise ValueError(f"unknown tile window {self.window!r}; choose {' or '.join(WINDOWS)}")
        if (self.tile is not None and self.tile < 0) or (self.overlap is not None and self.overlap < 0):
            raise ValueError("tile and overlap must not be negative")

    @classmethod
    def from_dict(cls, data: dict) -> "Tiling":
        return cls(**data)


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Origins of tiles of ``tile`` covering [0, length): multiples of ``multiple``, neighbours
    overlapping by at least ``overlap`` (when the length needs more than one tile)."""
    if tile < 1 or multiple < 1:
        raise ValueError("tile and multiple must be at least 1")
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of {multiple}")
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    step = max(multiple, (tile - overlap) // multiple * multiple)
    last = (length - tile + multiple - 1) // multiple * multiple  # may overhang: the caller pads
    starts = list(range(0, last, step))
    starts.append(last)
    return starts


def window_axis(n: int, kind: str = "gaussian", margin: int | None = None) -> np.ndarray:
    """(n,) float64 blending weights along one side, largest in the middle and > 0 everywhere."""
    if kind not in WINDOWS:
        raise ValueError(f"unknown window {kind!r}; choose one of {', '.join(WINDOWS)}")
    x = np.arange(n, dtype=np.float64) + 0.5
    if kind == "gaussian":
        sigma = n / 4
        return np.exp(-0.5 * ((x - n / 2) / sigma) ** 2)
    ramp = margin if margin else max(1, n // 4)
    return np.clip(np.minimum(x, n - x) / ramp, 1e-3, 1.0)


def window(height: int, width: int, kind: str = "gaussian", margin: int | None = None) -> np.ndarray:
    """(height, width) float64 blending weights: the outer product of the two sides' weights."""
    return np.outer(window_axis(height, kind, margin), window_axis(width, kind, margin))


def tiled_apply(fn: Callable[[np.ndarray, tuple[int, int]], np.ndarray], x: np.ndarray, tile: int, overlap: int,
                factor: float, multiple: int = 1, kind: str = "gaussian",
                on_tile: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Run ``fn(tile, (y0, x0))`` over overlapping tiles of ``x`` (N, C, H, W) and blend the outputs.

    ``factor`` is output side / input side (a float for the encoder's scale/downsample). The input
    is edge-padded so every tile is full-size and a multiple of ``multiple``; the output is cropped
    back to ``round(H * factor) x round(W * factor)``.
    """
    n, _, height, width = x.shape
    ys = tile_starts(height, tile, overlap, multiple)
    xs = tile_starts(width, tile, overlap, multiple)
    tile_h = tile if len(ys) > 1 or height > tile else -(-height // multiple) * multiple
    tile_w = tile if len(xs) > 1 or width > tile else -(-width // multiple) * multiple
    pad_h = max(ys[-1] + tile_h - height, 0)
    pad_w = max(xs[-1] + tile_w - width, 0)
    if pad_h or pad_w:
        x = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    out_h, out_w = round((height + pad_h) * factor), round((width + pad_w) * factor)
    acc = None
    total = len(ys) * len(xs)
    done = 0
    for y0 in ys:
        for x0 in xs:
            out = fn(np.ascontiguousarray(x[:, :, y0:y0 + tile_h, x0:x0 + tile_w]), (y0, x0))
            if acc is None:  # every tile has the same size, so one window serves them all
                oh, ow = out.shape[-2:]
                wy, wx = window_axis(oh, kind).astype(np.float32), window_axis(ow, kind).astype(np.float32)
                w = np.outer(wy, wx)
                acc = np.zeros((n, out.shape[1], out_h, out_w), dtype=np.float32)
            elif out.shape[-2:] != (oh, ow):
                raise ValueError(f"tile outputs differ in size: {out.shape[-2:]} after {(oh, ow)}")
            oy, ox = round(y0 * factor), round(x0 * factor)
            acc[:, :, oy:oy + oh, ox:ox + ow] += out * w
            done += 1
            if on_tile:
                on_tile(done, total)
    # the summed weights at (y, x) are (sum of the row windows at y) * (sum of the column windows
    # at x); dividing by each in place keeps the output the only full-size buffer
    sum_y, sum_x = np.zeros(out_h, np.float32), np.zeros(out_w, np.float32)
    for y0 in ys:
        sum_y[round(y0 * factor):round(y0 * factor) + oh] += wy
    for x0 in xs:
        sum_x[round(x0 * factor):round(x0 * factor) + ow] += wx
    acc /= sum_y[:, None]
    acc /= sum_x
    return acc[:, :, : round(height * factor), : round(width * factor)]
