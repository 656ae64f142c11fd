"""Degradation estimator: a CLIP image tower scored against stored text-embedding pairs.

For each dimension i with embeddings (t_pos, t_neg) and image embedding e (all L2-normalised):
``c = temperature * cos(e, t)``, ``s_i = exp(c_neg) / (exp(c_pos) + exp(c_neg))``.
The text embeddings are computed once (from the CLIP text tower for real weights) and stored,
so neither this module's export nor the runtime ever runs a text encoder.

The ``tiny`` preset has no pretrained CLIP offline: its small open_clip vision tower and its
"text" embeddings are fitted together to the known parameters of synthetic degradations
(see ``mordasr.data.degradations.target_scores``), so its scores mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mordasr.runtime.routing import router_windows

# open_clip's normalisation constants (OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DegradationEstimator(nn.Module):
    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, temperature: float,
                 image_size: int, trainable_text: bool = False) -> None:
        super().__init__()
        if text_embeddings.dim() != 3 or text_embeddings.shape[1] != 2:
            raise ValueError("text_embeddings must have shape (D, 2, E): (positive, negative) pairs")
        self.visual = visual
        if trainable_text:
            self.text_embeddings = nn.Parameter(text_embeddings.clone())
        else:
            self.register_buffer("text_embeddings", text_embeddings.clone())
        self.temperature = temperature
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Scores (N, D) in [0, 1] for images (N, 3, S, S) in [0, 1] at the router size."""
        x = (image - self.mean) / self.std
        emb = F.normalize(self.visual(x), dim=-1)
        text = F.normalize(self.text_embeddings, dim=-1)
        cos = torch.einsum("ne,dpe->ndp", emb, text) * self.temperature
        return torch.softmax(cos, dim=-1)[..., 1]

    @staticmethod
    def view(image: torch.Tensor, size: int) -> torch.Tensor:
        """The router's views (N, K, 3, size, size) of low-resolution images (N, 3, h, w): K
        native-resolution windows, or the image resized (K = 1) when it is smaller than ``size``
        (``mordasr.runtime.routing.router_windows``; their scores are averaged)."""
        windows = router_windows(image.shape[-2], image.shape[-1], size)
        if windows is None:
            resized = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            return resized.clamp(0, 1)[:, None]
        return torch.stack([image[..., y:y + size, x:x + size] for y, x in windows], dim=1)

    def score_views(self, views: torch.Tensor) -> torch.Tensor:
        """Scores (N, D) of views (N, K, 3, S, S): the mean over each image's K views."""
        n, k = views.shape[:2]
        return self(views.flatten(0, 1)).unflatten(0, (n, k)).mean(dim=1)


class ConvDegradationTower(nn.Module):
    """The ``tiny`` preset's image tower: a small conv net pooled by mean and std.

    Degradations (noise, blur, JPEG) are local statistics, which a few convolutions pooled over
    the image capture with far less data than a ViT trained from scratch (measured here: a
    2-layer ViT did not fit the synthetic scores in 600 steps; this tower did).
    """

    def __init__(self, embed_dim: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.proj = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        mean = h.mean(dim=(2, 3))
        std = (h - mean[..., None, None]).pow(2).mean(dim=(2, 3)).add(1e-6).sqrt()
        return self.proj(torch.cat([mean, std], dim=-1))


def build_vision_tower(embed_dim: int, vision_cfg: dict) -> nn.Module:
    """open_clip's vision tower for a CLIPVisionCfg, or the tiny conv tower (``type: conv``)."""
    cfg = dict(vision_cfg)
    if cfg.pop("type", "vit") == "conv":
        return ConvDegradationTower(embed_dim, **cfg)
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, cfg)


def text_embeddings_from_clip(clip_model: nn.Module, tokenizer,
                              prompts: Sequence[tuple[str, str, str]]) -> torch.Tensor:
    """Encode every (positive, negative) prompt once with an open_clip model: (D, 2, E)."""
    texts = [p for _, pos, neg in prompts for p in (pos, neg)]
    with torch.no_grad():
        emb = clip_model.encode_text(tokenizer(texts))
    return emb.reshape(len(prompts), 2, -1).float()
