"""Overlapping tiles and seam-free blending, for inputs larger than a graph's profile.

A function maps an input (N, C, H, W) to an output whose sides are ``factor`` times the input's
(the whole restore: the scale). ``tiled_apply`` runs it on overlapping input tiles whose origins
and sizes are multiples of ``multiple``, weights every output tile with a smooth window (Gaussian,
or linear ramps) and divides by the summed weights, so overlaps blend without seams and an
identity function reproduces its input. Working memory is one tile's run plus one float32
accumulator of the output's size (12 bytes per output pixel for RGB), or, when the output is
taken a band of rows at a time (``TiledBlend.bands``), one row of tiles' output: bounded for
any image height. The windows are separable and the tiles a full grid, so the summed weights
are the outer product of two vectors and need no buffer of the output's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from mordasr.runtime.images import as_float

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
        from mordasr.records import from_dict

        return from_dict(cls, data, "tiling")


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


class TiledBlend:
    """Run ``fn(tile, (y0, x0))`` over overlapping tiles of ``x`` (N, C, H, W) and blend the outputs.

    ``factor`` is output side / input side (a float for the encoder's scale/downsample). The input
    is edge-padded so every tile is full-size and a multiple of ``multiple``; ``tile`` is a side, or
    (height, width); the output is cropped
    back to ``round(H * factor) x round(W * factor)``. ``index`` (rows, cols) picks the image to
    tile out of ``x`` (default: all of it), e.g. a caller's padding written as indices. Tiles run
    a row of tiles at a time, top to bottom; once a row is done, the output rows above the next
    row's first tile are final.

    ``bands()`` yields those finished rows as (N, C, rows, W') float32 arrays, valid until the next
    one, while holding one row of tiles' output (the overlap with the next row shifted up in place
    once a band is handed over): what ``mordasr-run`` streams into a PNG. ``run()`` blends into one buffer of the
    output's size instead and returns it: the same values, bit for bit.
    """

    def __init__(self, fn: Callable[[np.ndarray, tuple[int, int]], np.ndarray], x: np.ndarray,
                 tile: int | tuple[int, int], overlap: int, factor: float, multiple: int = 1, kind: str = "gaussian",
                 on_tile: Callable[[int, int], None] | None = None,
                 index: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.fn, self.factor, self.kind, self.on_tile = fn, factor, kind, on_tile
        # Tiles are gathered from x one at a time through row and column indices, so padding (the
        # edge padding of the grid here, a caller's own through ``index``) copies no more than a tile.
        rows, cols = index if index is not None else (np.arange(x.shape[2]), np.arange(x.shape[3]))
        height, width = len(rows), len(cols)
        tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
        self.ys = tile_starts(height, tile_h, overlap, multiple)
        self.xs = tile_starts(width, tile_w, overlap, multiple)
        self.tile_h = tile_h if len(self.ys) > 1 or height > tile_h else -(-height // multiple) * multiple
        self.tile_w = tile_w if len(self.xs) > 1 or width > tile_w else -(-width // multiple) * multiple
        pad_h = max(self.ys[-1] + self.tile_h - height, 0)
        pad_w = max(self.xs[-1] + self.tile_w - width, 0)
        self.x = x
        self.rows, self.cols = np.pad(rows, (0, pad_h), mode="edge"), np.pad(cols, (0, pad_w), mode="edge")
        self.out_h, self.out_w = round((height + pad_h) * factor), round((width + pad_w) * factor)
        self.height, self.width = round(height * factor), round(width * factor)  # the output, cropped

    def tile(self, y0: int, x0: int) -> np.ndarray:
        """The (N, C, tile_h, tile_w) float32 input tile at (y0, x0), edge-padded where it overhangs
        (a uint8 ``x`` converted to [0, 1] a tile at a time)."""
        rows, cols = self.rows[y0:y0 + self.tile_h, None], self.cols[None, x0:x0 + self.tile_w]
        return np.ascontiguousarray(as_float(self.x[:, :, rows, cols]))

    def run(self) -> np.ndarray:
        """(N, C, H', W'): the whole blended output, a view of one buffer of its (padded) size."""
        for _ in self._blend(whole=True):
            pass
        return self._buffer[:, :, : self.height, : self.width]

    def bands(self) -> Iterator[np.ndarray]:
        """Finished output rows, top to bottom, (N, C, rows, W'), each valid until the next."""
        return self._blend(whole=False)

    def _blend(self, whole: bool) -> Iterator[np.ndarray]:
        factor, total, done = self.factor, len(self.ys) * len(self.xs), 0
        emitted = 0  # output rows finished so far
        for i, y0 in enumerate(self.ys):
            oy = round(y0 * factor)
            for j, x0 in enumerate(self.xs):
                out = self.fn(self.tile(y0, x0), (y0, x0))
                if done == 0:  # every tile has the same size, so one window serves them all
                    self._start(out, whole)
                elif out.shape[-2:] != (self.oh, self.ow):
                    raise ValueError(f"tile outputs differ in size: {out.shape[-2:]} after {(self.oh, self.ow)}")
                elif j == 0 and not whole:  # a new row of tiles: shift up the rows it shares with the last
                    keep = self._buffer.shape[2] - (oy - self._base)
                    self._buffer[:, :, :keep] = self._buffer[:, :, oy - self._base:]
                    self._buffer[:, :, keep:] = 0
                    self._base = oy
                ox = round(x0 * factor)
                self._buffer[:, :, oy - self._base:oy - self._base + self.oh, ox:ox + self.ow] += out * self.w
                done += 1
                if self.on_tile:
                    self.on_tile(done, total)
            end = round(self.ys[i + 1] * factor) if i + 1 < len(self.ys) else self.out_h
            band = self._buffer[:, :, emitted - self._base:end - self._base]
            # the summed weights at (y, x) are (sum of the row windows at y) * (sum of the column
            # windows at x); dividing by each in place needs no buffer of the output's size
            band /= self.sum_y[emitted:end, None]
            band /= self.sum_x
            rows = min(end, self.height) - emitted
            if rows > 0:
                yield band[:, :, :rows, : self.width]
            emitted = end

    def _start(self, out: np.ndarray, whole: bool) -> None:
        n, c, self.oh, self.ow = out.shape
        wy, wx = window_axis(self.oh, self.kind).astype(np.float32), window_axis(self.ow, self.kind).astype(np.float32)
        self.w = np.outer(wy, wx)
        self.sum_y, self.sum_x = np.zeros(self.out_h, np.float32), np.zeros(self.out_w, np.float32)
        for y0 in self.ys:
            self.sum_y[round(y0 * self.factor):round(y0 * self.factor) + self.oh] += wy
        for x0 in self.xs:
            self.sum_x[round(x0 * self.factor):round(x0 * self.factor) + self.ow] += wx
        self._buffer = np.zeros((n, c, self.out_h if whole else self.oh, self.out_w), np.float32)
        self._base = 0  # the output row of the buffer's first row


def tiled_apply(fn: Callable[[np.ndarray, tuple[int, int]], np.ndarray], x: np.ndarray, tile: int, overlap: int,
                factor: float, multiple: int = 1, kind: str = "gaussian",
                on_tile: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``TiledBlend(...).run()``: the blended output (N, C, round(H * factor), round(W * factor))."""
    return TiledBlend(fn, x, tile, overlap, factor, multiple, kind, on_tile).run()
