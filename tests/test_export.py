"""ONNX graphs vs PyTorch, per graph and mode, through ONNX Runtime on the CPU.

Tolerances (max abs difference, float32): router scores 1e-5; encoder latent, UNet noise and
decoder image 1e-4. They are checked at shapes other than the traced one (dynamic dims), with a
batch of 2.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mordasr.errors import MordasrError
from mordasr.export.buckets import kmeans, label, make_buckets
from mordasr.export.bundle import export_bundle
from mordasr.export.graphs import lr_multiple
from mordasr.model import preset_config
from mordasr.model.inject import fold_adapters
from mordasr.runtime.manifest import load_manifest

TOLERANCE = {"router": 1e-5, "encoder": 1e-4, "unet": 1e-4, "decoder": 1e-4}


def _run(bundle, file, feeds):
    session = ort.InferenceSession(str(bundle / file), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


LATENT = preset_config("tiny").latent_channels


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    size = preset_config("tiny").router_image_size
    # LR sides multiples of 4 and latent sides multiples of 8 (the tiny preset's lr_multiple)
    return {"image_lr": torch.rand(2, 3, 12, 16, generator=g),
            "router_image": torch.rand(2, 3, size, size, generator=g),
            "latent": torch.randn(2, LATENT, 16, 24, generator=g),
            "scores": torch.rand(2, 7, generator=g)}


def _check(name, got, want):
    err = np.abs(got - want.numpy()).max()
    assert err <= TOLERANCE[name], f"{name}: max abs diff {err:.2e} > {TOLERANCE[name]:.0e}"


def test_gated_graphs_match_pytorch(tiny_model, gated_bundle):
    x = _inputs()
    m = tiny_model
    with torch.no_grad():
        _check("router", _run(gated_bundle, "router.onnx", {"image": x["router_image"]}),
               m.estimator(x["router_image"]))
        with m.routing.scores_for(x["scores"]):
            _check("encoder", _run(gated_bundle, "encoder.onnx", {"image": x["image_lr"], "scores": x["scores"]}),
                   m.encode(x["image_lr"]))
            _check("unet", _run(gated_bundle, "unet.onnx", {"latent": x["latent"], "scores": x["scores"]}),
                   m.denoise(x["latent"]))
        _check("decoder", _run(gated_bundle, "decoder.onnx", {"latent": x["latent"]}), m.decode(x["latent"]))


def test_folded_graphs_match_pytorch(tiny_model, tiny_buckets, folded_bundle):
    x = _inputs(1)
    for bucket in tiny_buckets:
        centre = torch.tensor(bucket.centre)
        folded = fold_adapters(tiny_model, centre)
        with torch.no_grad():
            _check("encoder", _run(folded_bundle, f"encoder.b{bucket.index}.onnx", {"image": x["image_lr"]}),
                   folded.encode(x["image_lr"]))
            _check("unet", _run(folded_bundle, f"unet.b{bucket.index}.onnx", {"latent": x["latent"]}),
                   folded.denoise(x["latent"]))
            # ... and the folded graph equals the gated model routed by the bucket centre.
            with tiny_model.routing.scores_for(centre[None].expand(2, -1)):
                _check("unet", _run(folded_bundle, f"unet.b{bucket.index}.onnx", {"latent": x["latent"]}),
                       tiny_model.denoise(x["latent"]))


def test_graphs_are_clean_and_checked(folded_bundle, gated_bundle):
    for bundle in (folded_bundle, gated_bundle):
        manifest = load_manifest(bundle)
        for g in manifest.graphs:
            model = onnx.load(str(bundle / g.file))
            onnx.checker.check_model(model, full_check=True)
            ops = {n.op_type for n in model.graph.node}
            # No data-dependent control flow or shapes in the exported graphs.
            assert not ops & {"If", "Loop", "NonZero", "Scan", "DFT"}, (g.file, ops)
            assert model.opset_import[0].version >= 17


def test_open_clip_vit_router_matches_pytorch(tmp_path):
    """The sd21 router is an open_clip ViT tower: its graph must match too (tiny widths here)."""
    from types import SimpleNamespace

    from open_clip.model import CLIPVisionCfg

    from mordasr.export.graphs import ComponentSpec, IOSpec, RouterGraph
    from mordasr.export.onnx_export import export_onnx
    from mordasr.model.estimator import DegradationEstimator, build_vision_tower

    torch.manual_seed(0)
    cfg = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32)
    tower = build_vision_tower(16, {k: getattr(cfg, k) for k in ("layers", "width", "head_width",
                                                                  "patch_size", "image_size")})
    est = DegradationEstimator(tower, torch.randn(7, 2, 16), 100.0, 32).eval()
    spec = ComponentSpec("router", (IOSpec("image", ("batch", 3, 32, 32)),), (IOSpec("scores", ("batch", 7)),))
    export_onnx(RouterGraph(SimpleNamespace(estimator=est)), (torch.rand(1, 3, 32, 32),), spec, tmp_path / "r.onnx")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        _check("router", _run(tmp_path, "r.onnx", {"image": x}), est(x))


def test_gated_unet_routes_with_constant_k_topk(gated_bundle):
    model = onnx.load(str(gated_bundle / "unet.onnx"))
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert topk, "gated UNet should route with TopK"
    consts = {i.name for i in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    assert all(n.input[1] in consts for n in topk)


def test_folded_graphs_hold_no_routing(folded_bundle):
    model = onnx.load(str(folded_bundle / "unet.b0.onnx"))
    assert [i.name for i in model.graph.input] == ["latent"]
    assert not any(n.op_type == "TopK" for n in model.graph.node)


def test_manifest_records_io_and_hashes(folded_bundle, tiny_buckets):
    data = json.loads((folded_bundle / "manifest.json").read_text())
    assert data["schema_version"] == 2 and data["mode"] == "folded" and data["precision"] == "fp32"
    files = {g["file"] for g in data["graphs"]}
    assert files == {"router.onnx", "decoder.onnx", "encoder.b0.onnx", "encoder.b1.onnx",
                     "unet.b0.onnx", "unet.b1.onnx"}
    unet = next(g for g in data["graphs"] if g["file"] == "unet.b0.onnx")
    assert unet["inputs"] == [{"name": "latent", "dtype": "float32",
                               "shape": ["batch", LATENT, "latent_height", "latent_width"]}]
    assert len(data["buckets"]) == len(tiny_buckets)
    assert data["scheduler"]["timestep"] == preset_config("tiny").timestep
    alpha = data["scheduler"]["sqrt_alpha_prod"] ** 2 + data["scheduler"]["sqrt_one_minus_alpha_prod"] ** 2
    assert abs(alpha - 1) < 1e-9
    assert [d["name"] for d in data["degradations"]][:3] == ["quality", "blur", "noise"]


def test_export_refuses_existing_folder_and_bad_mode(tiny_model, tiny_buckets, tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(MordasrError, match="already exists"):
        export_bundle(tiny_model, tmp_path / "b", "gated", tiny_buckets)
    with pytest.raises(MordasrError, match="unknown mode"):
        export_bundle(tiny_model, tmp_path / "c", "hybrid-x", tiny_buckets)
    assert not (tmp_path / "c").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary folder left behind


def test_kmeans_buckets_are_deterministic_and_ordered():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0.1, 0.02, (50, 7)), rng.normal(0.8, 0.02, (50, 7))]).clip(0, 1)
    a, b = kmeans(points, 2, seed=3), kmeans(points, 2, seed=3)
    assert np.array_equal(a, b)
    assert a[0].mean() < 0.2 and a[1].mean() > 0.7
    names = ["quality", "blur", "noise", "resolution", "edges", "detail", "compression"]
    buckets = make_buckets(a, names)
    assert buckets[0].label == "b0-mild" and buckets[1].label.startswith("b1-blur+noise")
    assert label(np.zeros(7), names) == "mild"
    with pytest.raises(ValueError):
        kmeans(points[:1], 2)


def test_lr_multiple(tiny_model):
    # tiny: VAE /2 and UNet /8 -> latent side a multiple of 8 -> LR side a multiple of 4 (x4 first)
    assert lr_multiple(tiny_model) == 4
