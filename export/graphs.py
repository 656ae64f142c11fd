"""One exportable module per component, and its I/O spec (names, dims) in one place.

The manifest records these specs; the runtime reads them from the manifest and never repeats
them. Dynamic dims are named so the manifest (and later TensorRT profiles) can refer to them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from mordasr.model import OneStepSR


@dataclass(frozen=True)
class IOSpec:
    name: str
    dims: tuple[int | str, ...]  # int: fixed, str: named dynamic dim


@dataclass(frozen=True)
class ComponentSpec:
    component: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {io.name: {i: d for i, d in enumerate(io.dims) if isinstance(d, str)}
                for io in self.inputs + self.outputs}


class RouterGraph(nn.Module):
    """image (N, 3, S, S) in [0, 1] at the router size -> scores (N, D)."""

    def __init__(self, model: OneStepSR) -> None:
        super().__init__()
        self.estimator = model.estimator

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.estimator(image)


def routed(model: OneStepSR, scores: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """The scores a gated graph takes as its input, for the adapter layers; a folded or merged
    graph reads none (its routing is in its weights)."""
    return model.routing.scores_for(scores) if scores is not None else contextlib.nullcontext()


class EncoderGraph(nn.Module):
    """Low-resolution image (N, 3, h, w) in [0, 1] [+ scores when gated] -> scaled latent mean."""

    def __init__(self, model: OneStepSR, gated: bool) -> None:
        super().__init__()
        self.model = model
        self.gated = gated

    def forward(self, image: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        with routed(self.model, scores if self.gated else None):
            return self.model.encode(image)


class UNetGraph(nn.Module):
    """Latent (N, C, H/f, W/f) [+ scores when gated] -> noise prediction, t and text baked in."""

    def __init__(self, model: OneStepSR, gated: bool) -> None:
        super().__init__()
        self.model = model
        self.gated = gated

    def forward(self, latent: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        with routed(self.model, scores if self.gated else None):
            return self.model.denoise(latent)


class DecoderGraph(nn.Module):
    """Scaled latent -> image (N, 3, H, W) in [0, 1]."""

    def __init__(self, model: OneStepSR) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)


def component_specs(model: OneStepSR, gated: bool) -> dict[str, ComponentSpec]:
    cfg = model.config
    c, d, s = cfg.latent_channels, cfg.num_degradations, cfg.router_image_size
    scores = (IOSpec("scores", ("batch", d)),) if gated else ()
    latent = IOSpec("latent", ("batch", c, "latent_height", "latent_width"))
    return {
        "router": ComponentSpec("router", (IOSpec("image", ("batch", 3, s, s)),),
                                (IOSpec("scores", ("batch", d)),)),
        "encoder": ComponentSpec("encoder", (IOSpec("image", ("batch", 3, "height", "width")),) + scores,
                                 (latent,)),
        "unet": ComponentSpec("unet", (latent,) + scores,
                              (IOSpec("noise", ("batch", c, "latent_height", "latent_width")),)),
        "decoder": ComponentSpec("decoder", (latent,),
                                 (IOSpec("image", ("batch", 3, "out_height", "out_width")),)),
    }


def lr_multiple(model: OneStepSR) -> int:
    """Input sides must be multiples of this so every down/upsampling stage lines up."""
    import math

    unet_down = 2 ** (len(model.config.unet["block_out_channels"]) - 1)
    total = model.config.latent_downsample * unet_down
    return total // math.gcd(total, model.config.scale)


def example_inputs(model: OneStepSR, component: str, gated: bool, lr_size: int = 16,
                   batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs to trace (and to test parity with), sized for the given low-resolution side."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    d = cfg.num_degradations
    latent_side = lr_size * cfg.scale // cfg.latent_downsample
    scores = (torch.rand(batch, d, generator=g),) if gated else ()
    if component == "router":
        s = cfg.router_image_size
        return (torch.rand(batch, 3, s, s, generator=g),)
    if component == "encoder":
        return (torch.rand(batch, 3, lr_size, lr_size, generator=g),) + scores
    latent = torch.randn(batch, cfg.latent_channels, latent_side, latent_side, generator=g)
    if component == "unet":
        return (latent,) + scores
    if component == "decoder":
        return (latent,)
    raise ValueError(f"unknown component {component!r}")
