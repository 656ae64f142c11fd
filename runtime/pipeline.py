"""Restorer: image -> router -> bucket or gates -> encoder -> UNet -> x0 step -> decoder -> image.

Everything a bundle needs to know about its graphs comes from its manifest; this module only
moves numpy arrays between them in the order of the MoR-DASR data path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mordasr.errors import ImageError
from mordasr.runtime.backends import create_backend
from mordasr.runtime.images import resize
from mordasr.runtime.manifest import GraphSpec, load_manifest
from mordasr.runtime.routing import nearest_bucket


@dataclass
class RestoreResult:
    image: np.ndarray  # float32 (H*scale, W*scale, 3) in [0, 1]
    scores: np.ndarray  # (D,) degradation scores, higher = worse
    bucket: int | None  # folded bundles: the bucket whose graphs ran


# Called after each graph run with (graph, feeds, output); calibration and reports use it.
Tap = Callable[[GraphSpec, dict, np.ndarray], None]


class Restorer:
    def __init__(self, bundle_dir: str | Path, backend: str = "onnxruntime", tap: Tap | None = None,
                 **backend_options) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.tap = tap
        self.manifest = load_manifest(self.bundle_dir)
        self.backend = create_backend(backend, self.manifest, self.bundle_dir, **backend_options)
        self.centres = np.array([b.centre for b in self.manifest.buckets], dtype=np.float32)
        sched = self.manifest.scheduler
        self.sqrt_alpha = np.float32(sched["sqrt_alpha_prod"])
        self.sqrt_one_minus_alpha = np.float32(sched["sqrt_one_minus_alpha_prod"])

    @property
    def scale(self) -> int:
        return self.manifest.scale

    def _run(self, component: str, bucket: int | None, **feeds: np.ndarray) -> np.ndarray:
        graph = self.manifest.graph(component, bucket)
        wanted = {t.name for t in graph.inputs}
        feeds = {k: v for k, v in feeds.items() if k in wanted}
        output = self.backend.run(graph, feeds)[graph.outputs[0].name]
        if self.tap is not None:
            self.tap(graph, feeds, output)
        return output

    def scores(self, image: np.ndarray) -> np.ndarray:
        """Degradation scores (D,) of a low-resolution image (H, W, 3) in [0, 1]."""
        size = self.manifest.router_image_size
        view = resize(image, size, size).clip(0, 1).transpose(2, 0, 1)[None]
        return self._run("router", None, image=np.ascontiguousarray(view, dtype=np.float32))[0]

    def restore(self, image: np.ndarray, bucket: int | None = None) -> RestoreResult:
        """Super-resolve one low-resolution image (H, W, 3) float in [0, 1].

        ``bucket`` forces a folded bundle's bucket instead of the router's nearest one.
        """
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"expected an (H, W, 3) image, got shape {image.shape}")
        height, width = image.shape[:2]
        # 1. router: degradation scores of the whole image
        scores = self.scores(image)
        # 2. routing: folded bundles pick the nearest bucket; gated bundles feed the scores
        if self.manifest.mode != "folded":
            bucket = None
        elif bucket is None:
            bucket = int(nearest_bucket(scores, self.centres)[0])
        elif not 0 <= bucket < len(self.centres):
            raise ValueError(f"bucket {bucket} out of range 0..{len(self.centres) - 1}")
        score_feed = scores[None].astype(np.float32)
        # pad to the multiple the graphs need (reflect), crop the output back
        m = self.manifest.lr_multiple
        pad_h, pad_w = (-height) % m, (-width) % m
        x = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect" if min(height, width) > 1 else "edge")
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
        # 3. encoder (bicubic upsample inside the graph) -> latent mean
        z_l = self._run("encoder", bucket, image=x, scores=score_feed)
        # 4. UNet noise prediction at the fixed timestep
        eps = self._run("unet", bucket, latent=z_l, scores=score_feed)
        # 5. one x0 step of the scheduler
        z_h = (z_l - self.sqrt_one_minus_alpha * eps) / self.sqrt_alpha
        # 6. decoder -> image in [0, 1]
        out = self._run("decoder", None, latent=z_h.astype(np.float32))
        s = self.scale
        restored = out[0, :, : height * s, : width * s].transpose(1, 2, 0)
        return RestoreResult(np.ascontiguousarray(restored), scores, bucket)
