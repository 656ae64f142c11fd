"""Shared fixtures: a small random-weight tiny model (adapters made non-trivial) and bundles."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mordasr.model import OneStepSR, preset_config


def make_tiny_model(adapter: str = "mor", seed: int = 0, **unet: object) -> OneStepSR:
    """Random tiny model whose adapters actually change the output (B is zero at init); ``unet``
    overrides the preset's UNet shape (``block_out_channels``, ``layers_per_block``)."""
    torch.manual_seed(seed)
    config = preset_config("tiny", adapter=adapter)
    model = OneStepSR(replace(config, unet={**config.unet, **unet})).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> OneStepSR:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_buckets(tiny_model):
    from mordasr.export.buckets import make_buckets

    rng = np.random.default_rng(0)
    names = [p[0] for p in tiny_model.config.prompts]
    return make_buckets(rng.uniform(0, 1, (2, tiny_model.config.num_degradations)).astype(np.float32), names)


@pytest.fixture(scope="session")
def folded_bundle(tiny_model, tiny_buckets, tmp_path_factory):
    from mordasr.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "folded"
    export_bundle(tiny_model, path, "folded", tiny_buckets)
    return path


@pytest.fixture(scope="session")
def gated_bundle(tiny_model, tiny_buckets, tmp_path_factory):
    from mordasr.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "gated"
    export_bundle(tiny_model, path, "gated", tiny_buckets[:1])
    return path


@pytest.fixture(scope="session")
def hybrid_bundle(tiny_model, tiny_buckets, tmp_path_factory):
    from mordasr.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "hybrid"
    export_bundle(tiny_model, path, "hybrid", tiny_buckets[:1])
    return path


@pytest.fixture(scope="session")
def lora_model() -> OneStepSR:
    return make_tiny_model("lora")


@pytest.fixture(scope="session")
def dense_lora_bundle(lora_model, tiny_buckets, tmp_path_factory):
    from mordasr.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("bundles") / "dense-lora"
    export_bundle(lora_model, path, "dense-lora", tiny_buckets[:1])
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
