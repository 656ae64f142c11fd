"""Restorer: image -> router -> bucket or gates -> encoder -> UNet -> x0 step -> decoder -> image.

Images larger than the bundle's profile run the same steps over overlapping, blended tiles;
``restore_stream`` hands the output over a band of finished rows at a time instead of whole.
A graph whose output is not finite (an FP16 VAE overflowing) is rerun in its FP32 graph when the
bundle ships one; otherwise the restore fails: a NaN or black image is never returned silently.

Everything a bundle needs to know about its graphs comes from its manifest; this module only
moves numpy arrays between them in the order of the MoR-DASR data path.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mordasr.errors import ImageError, MordasrError
from mordasr.runtime.backends import create_backend
from mordasr.runtime.images import as_float, resize
from mordasr.runtime.manifest import GraphSpec, load_manifest
from mordasr.runtime.routing import MAX_WINDOWS, nearest_bucket, router_windows
from mordasr.runtime.tiling import TiledBlend, Tiling

log = logging.getLogger("mordasr.runtime")


class NonFiniteOutput(MordasrError):
    """A graph produced NaN/inf and no FP32 graph could replace it."""


@dataclass
class RestoreResult:
    image: np.ndarray  # float32 (H*scale, W*scale, 3) in [0, 1]; a view of the output buffer (strided)
    scores: np.ndarray  # (D,) degradation scores, higher = worse
    bucket: int | None  # folded bundles: the bucket whose graphs ran


@dataclass
class RestoreStream:
    """A restore whose output comes a band of rows at a time, so that no array of the output's
    size is held (``mordasr-run`` writes each band into its file as it comes)."""

    bands: Iterator[np.ndarray]  # float32 (rows, W*scale, 3) in [0, 1], top to bottom, each valid until the next
    size: tuple[int, int]  # (height, width) of the output
    scores: np.ndarray
    bucket: int | None


# Called after each graph run with (graph, feeds, output); calibration and reports use it.
Tap = Callable[[GraphSpec, dict, np.ndarray], None]
# Called after each tile of a tiled restore with (tiles done, tiles in all); mordasr-run's bar.
Progress = Callable[[int, int], None]


def _router_views(image: np.ndarray, size: int) -> np.ndarray:
    """(K, size, size, 3): the native-resolution windows the router scores, or the image resized."""
    windows = router_windows(image.shape[0], image.shape[1], size)
    if windows is None:
        return resize(as_float(image), size, size).clip(0, 1)[None]
    return np.stack([as_float(image[y:y + size, x:x + size]) for y, x in windows])


class Restorer:
    def __init__(self, bundle_dir: str | Path, backend: str = "onnxruntime", tap: Tap | None = None,
                 verify_hashes: bool = True, **backend_options) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.tap = tap
        # verify_hashes=False: the graphs live elsewhere (a Triton repository checked when written)
        self.manifest = load_manifest(self.bundle_dir, verify_hashes=verify_hashes)
        # Unset switches follow the device profile the bundle was exported for.
        device = self.manifest.device
        if backend_options.get("bucket_switch") is None:
            backend_options["bucket_switch"] = device.get("bucket_switch", "graphs")
        if backend == "tensorrt" and backend_options.get("max_engines") is None:
            backend_options["max_engines"] = device.get("max_engines") or 8
        self.backend = create_backend(backend, self.manifest, self.bundle_dir, **backend_options)
        self.centres = np.array([b.centre for b in self.manifest.buckets], dtype=np.float32)
        sched = self.manifest.scheduler
        self.sqrt_alpha = np.float32(sched["sqrt_alpha_prod"])
        self.sqrt_one_minus_alpha = np.float32(sched["sqrt_one_minus_alpha_prod"])
        self.fallbacks: Counter[str] = Counter()  # graph key -> times rerun in FP32

    def close(self) -> None:
        """Free the backend's sessions, engines and buffers (``with Restorer(...) as r:`` does it)."""
        self.backend.close()

    def __enter__(self) -> "Restorer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def device_warnings(self) -> list[str]:
        """How this machine differs from the device profile the bundle was exported for."""
        if not self.manifest.device:
            return []
        from mordasr.runtime.devices import detect_host, device_warnings

        return device_warnings(self.manifest.device, detect_host())

    @property
    def scale(self) -> int:
        return self.manifest.scale

    def _run(self, component: str, bucket: int | None, **feeds: np.ndarray) -> np.ndarray:
        graph = self.manifest.graph(component, bucket)
        wanted = {t.name for t in graph.inputs}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        output = self.backend.run(graph, feeds)[graph.outputs[0].name]
        if not np.isfinite(output).all():
            output = self._rerun_in_fp32(graph, feeds, output)
        if self.tap is not None:
            self.tap(graph, feeds, output)
        return output

    def _rerun_in_fp32(self, graph: GraphSpec, feeds: dict, output: np.ndarray) -> np.ndarray:
        bad = int(output.size - np.isfinite(output).sum())
        fallback = self.manifest.fallback_graph(graph)
        if fallback is None:
            hint = (f"re-export with --fp32-fallback {graph.component}, or run the FP32 bundle"
                    if graph.precision != "fp32" else "the input or the bundle is broken")
            raise NonFiniteOutput(f"{graph.key} ({graph.precision}) produced {bad} NaN/inf values and the "
                                  f"bundle has no FP32 graph to rerun it: {hint}")
        if graph.key not in self.fallbacks:
            log.warning("%s: %s output had %d NaN/inf values; reran it in its FP32 graph %s "
                        "(said once; later reruns are counted in Restorer.fallbacks)",
                        graph.key, graph.precision, bad, fallback.file)
        self.fallbacks[graph.key] += 1
        output = self.backend.run(fallback, feeds)[fallback.outputs[0].name]
        if not np.isfinite(output).all():
            raise NonFiniteOutput(f"{graph.key}: even its FP32 graph produced NaN/inf; the input image "
                                  "or the bundle is broken")
        return output

    def scores(self, image: np.ndarray) -> np.ndarray:
        """Degradation scores (D,) of a low-resolution image (H, W, 3) in [0, 1]."""
        return self.scores_batch([image])[0]

    def route(self, scores: np.ndarray, bucket: int | None = None) -> int | None:
        """Folded bundles: the forced or nearest bucket; other modes take the scores as input."""
        if self.manifest.mode != "folded":
            return None
        if bucket is None:
            return int(nearest_bucket(scores, self.centres)[0])
        if not 0 <= bucket < len(self.centres):
            raise ValueError(f"bucket {bucket} out of range 0..{len(self.centres) - 1}")
        return bucket

    def default_tile(self) -> int | None:
        """LR tile side from the bundle's profile (its largest output), or None: no tiling."""
        largest = self.manifest.profile.get("max") if self.manifest.profile else None
        return min(largest) // self.scale if largest else None

    def restore(self, image: np.ndarray, bucket: int | None = None, tiling: Tiling = Tiling(),
                on_tile: Progress | None = None) -> RestoreResult:
        """Super-resolve one low-resolution image (H, W, 3): float in [0, 1], or uint8 (0-255).

        ``bucket`` forces a folded bundle's bucket instead of the router's nearest one. Images
        with a side above ``tiling.tile`` LR pixels (default: the bundle profile's largest output
        / scale) run in overlapping tiles (``tiling.overlap`` LR pixels, default tile / 4) blended
        with ``tiling.window``; ``tiling.per_tile_routing`` scores each tile instead of the whole image.
        ``on_tile(done, total)`` hears of each tile restored.
        """
        _check_image(image)
        # 1. router: degradation scores of the whole image (a downscaled view)
        scores = self.scores(image)
        return self._restore_scored(image, scores, bucket, tiling, on_tile)

    def restore_stream(self, image: np.ndarray, bucket: int | None = None, tiling: Tiling = Tiling(),
                       on_tile: Progress | None = None) -> RestoreStream:
        """``restore`` with the output handed over a band of finished rows at a time: a tiled
        restore then holds one row of tiles' output instead of the whole image. The same
        values as ``restore``, bit for bit."""
        _check_image(image)
        scores = self.scores(image)
        bucket, score_feed, blend = self._plan(image, scores, bucket, tiling, on_tile)
        height, width = image.shape[0] * self.scale, image.shape[1] * self.scale
        if blend is None:
            bands = iter([self._crop(self._restore_whole(self._pad(image), bucket, score_feed)[0], image)])
        else:
            bands = self._cropped_bands(blend, image)
        return RestoreStream(bands, (height, width), scores, bucket)

    def _restore_scored(self, image: np.ndarray, scores: np.ndarray, bucket: int | None,
                        tiling: Tiling, on_tile: Progress | None = None) -> RestoreResult:
        bucket, score_feed, blend = self._plan(image, scores, bucket, tiling, on_tile)
        out = self._restore_whole(self._pad(image), bucket, score_feed) if blend is None else blend.run()  # 3.-6.
        return RestoreResult(self._crop(out[0], image), scores, bucket)

    def _plan(self, image: np.ndarray, scores: np.ndarray, bucket: int | None, tiling: Tiling,
              on_tile: Progress | None) -> tuple[int | None, np.ndarray, TiledBlend | None]:
        """(bucket, the scores feed, the image's tiles or None when it runs in one piece)."""
        # 2. routing: folded bundles pick the nearest bucket; gated/hybrid feed the scores
        bucket = self.route(scores, bucket)
        score_feed = scores[None].astype(np.float32)
        tile = self._tile(tiling)
        index = self._tiled_index(image, tile)
        if index is None:
            return bucket, score_feed, None
        # tiles are gathered from the image itself: no padded copy of a large input is made
        blend = self._tiled(image.transpose(2, 0, 1)[None], index, bucket, score_feed, tile, tiling, on_tile)
        return (None if tiling.per_tile_routing else bucket), score_feed, blend

    def restore_batch(self, images: list[np.ndarray], tiling: Tiling = Tiling(),
                      on_tile: Progress | None = None) -> list[RestoreResult]:
        """Several images at once (a server's dynamic batch): one router call for all, then one
        call per graph for each group of images with the same size and bucket. Images larger
        than the tile run alone, as in ``restore``."""
        for image in images:
            _check_image(image)
        if not images:
            return []
        scores = self.scores_batch(images)
        buckets = [self.route(s) for s in scores]
        padded: dict[int, np.ndarray] = {}  # only the images restored whole: a tiled one is never copied
        results: list[RestoreResult | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            if self.is_tiled(image, tiling):
                results[i] = self._restore_scored(image, scores[i], None, tiling, on_tile)
            else:
                padded[i] = self._pad(image)
                groups.setdefault((padded[i].shape, buckets[i]), []).append(i)
        step = self.manifest.max_batch  # what the graphs' profiles take: a larger group runs in parts
        for (_, bucket), group in groups.items():
            for members in (group[i:i + step] for i in range(0, len(group), step)):
                out = self._restore_whole(np.concatenate([padded[i] for i in members]), bucket,
                                          scores[members].astype(np.float32))
                for row, i in enumerate(members):
                    results[i] = RestoreResult(self._crop(out[row], images[i]), scores[i], bucket)
        return results

    def scores_batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Degradation scores (N, D) of several images in one router call."""
        views = [_router_views(image, self.manifest.router_image_size) for image in images]
        batch = np.ascontiguousarray(np.concatenate(views).transpose(0, 3, 1, 2), dtype=np.float32)
        step = MAX_WINDOWS * self.manifest.max_batch  # the router profile's largest batch
        scores = np.concatenate([self._run("router", None, image=batch[i:i + step])
                                 for i in range(0, len(batch), step)])
        per_image = np.split(scores, np.cumsum([len(v) for v in views])[:-1])
        return np.stack([part.mean(axis=0) for part in per_image])

    def _padded_index(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of an image padded (reflect) to the multiple the graphs need, and up to
        the smallest size the backend's graphs take (a TensorRT profile's minimum)."""
        m = self.manifest.lr_multiple
        least_h, least_w = self.backend.min_input or (0, 0)
        mode = "reflect" if min(height, width) > 1 else "edge"
        return (np.pad(np.arange(height), (0, max((-height) % m, least_h - height)), mode=mode),
                np.pad(np.arange(width), (0, max((-width) % m, least_w - width)), mode=mode))

    def is_tiled(self, image: np.ndarray, tiling: Tiling = Tiling()) -> bool:
        """Whether ``image`` runs in tiles with ``tiling``."""
        return self._tiled_index(image, self._tile(tiling)) is not None

    def _tile(self, tiling: Tiling) -> int | None:
        """The tile side in LR pixels: ``tiling.tile``, else the profile's (None or 0: no tiles)."""
        return tiling.tile if tiling.tile is not None else self.default_tile()

    def _tiled_index(self, image: np.ndarray, tile: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The padded rows and columns of an image that needs tiles of ``tile`` LR pixels, or None
        when it runs in one piece."""
        rows, cols = self._padded_index(*image.shape[:2])
        return (rows, cols) if tile and max(len(rows), len(cols)) > tile else None

    def _pad(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, H', W') with H', W' padded (reflect) to the multiple the graphs need."""
        rows, cols = self._padded_index(*image.shape[:2])
        return np.ascontiguousarray(as_float(image[rows[:, None], cols]).transpose(2, 0, 1)[None])

    def _restore_whole(self, x: np.ndarray, bucket: int | None, score_feed: np.ndarray) -> np.ndarray:
        # 3. encoder (bicubic upsample inside the graph) -> latent mean
        z_l = self._run("encoder", bucket, image=x, scores=score_feed)
        # 4. UNet noise prediction at the fixed timestep
        eps = self._run("unet", bucket, latent=z_l, scores=score_feed)
        # 5. one x0 step of the scheduler
        z_h = (z_l - self.sqrt_one_minus_alpha * eps) / self.sqrt_alpha
        # 6. decoder -> image in [0, 1]
        return self._run("decoder", None, latent=z_h.astype(np.float32))

    def _crop(self, out: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(3, H', W') output -> (H*scale, W*scale, 3), with a warning when it came out flat. A view,
        not a copy: the output buffer is the only full-size array a restore holds."""
        height, width = image.shape[:2]
        s = self.scale
        restored = out[:, : height * s, : width * s].transpose(1, 2, 0)
        _warn_if_flat(float(restored.min()), float(restored.max()), image)
        return restored

    def _cropped_bands(self, blend: TiledBlend, image: np.ndarray) -> Iterator[np.ndarray]:
        height, width = image.shape[0] * self.scale, image.shape[1] * self.scale
        emitted, low, high = 0, np.inf, -np.inf
        for band in blend.bands():
            rows = band[0, :, : height - emitted, :width].transpose(1, 2, 0)
            if len(rows):
                low, high = min(low, float(rows.min())), max(high, float(rows.max()))
                yield rows
            emitted += len(rows)
        _warn_if_flat(low, high, image)

    def _tiled(self, x: np.ndarray, index: tuple[np.ndarray, np.ndarray], bucket: int | None,
               score_feed: np.ndarray, tile: int, tiling: Tiling, on_tile: Progress | None) -> TiledBlend:
        """The same steps 3.-6. on overlapping LR tiles, each restored end to end and blended:
        into one output buffer (``run``, memory linear in pixels) or a band of rows at a time
        (``bands``, bounded memory)."""
        m = self.manifest.lr_multiple
        tile = max(m, tile // m * m)
        overlap = (tile // 4 if tiling.overlap is None else tiling.overlap) // m * m
        overlap = min(overlap, tile - m)

        def restore_tile(t: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
            if not tiling.per_tile_routing:
                return self._restore_whole(t, bucket, score_feed)
            tile_scores = self.scores(t[0].transpose(1, 2, 0))
            return self._restore_whole(t, self.route(tile_scores), tile_scores[None].astype(np.float32))

        return TiledBlend(restore_tile, x, tile, overlap, self.scale, m, tiling.window, on_tile, index)


def _warn_if_flat(low: float, high: float, image: np.ndarray) -> None:
    if high - low < 1 / 255 and np.ptp(image) > 0.05 * (255 if image.dtype == np.uint8 else 1):
        log.warning("the restored image is flat (every pixel about %.3f) while the input is not: "
                    "a graph may have overflowed; compare with the FP32 bundle or --compare-backends",
                    (low + high) / 2)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImageError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ImageError(f"expected a float image in [0, 1] or a uint8 one, got {image.dtype}")
