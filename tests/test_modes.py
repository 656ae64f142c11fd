"""Hybrid and dense-LoRA exports, weight packs, bucket switching by refit, large-graph export,
backend comparison: each checked through ONNX Runtime against PyTorch or against each other."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from mordasr.errors import BundleError, MordasrError
from mordasr.export.buckets import grid_buckets
from mordasr.export.bundle import check_mode, export_bundle
from mordasr.export.graphs import example_inputs
from mordasr.graphs.packs import apply_pack, differing_tensors
from mordasr.model.adapters import MoRLayer
from mordasr.model.inject import adapter_layers, fold_adapters, hybrid_adapters
from mordasr.runtime import Restorer, load_manifest
from mordasr.runtime.cli import main as run_main
from mordasr.runtime.compare import compare_backends
from mordasr.tests.conftest import make_tiny_model

IMAGE = np.random.default_rng(3).uniform(0, 1, (12, 16, 3)).astype(np.float32)


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _torch_restore(model, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
        return model(x)[0].numpy().transpose(1, 2, 0)


def test_split_shared_keeps_every_layer_output(tiny_model):
    scores = torch.rand(3, tiny_model.config.num_degradations, generator=torch.Generator().manual_seed(0))
    for _, layer in list(adapter_layers(tiny_model))[:6]:
        routed = layer.split_shared()
        assert isinstance(routed, MoRLayer) and routed.rank == layer.r_routed and routed.r_shared == 0
        shape = (3, layer.base_layer.in_channels, 6, 6) if layer.is_conv else (3, 5, layer.base_layer.in_features)
        x = torch.randn(shape)
        with torch.no_grad(), layer.routing.scores_for(scores):
            assert torch.allclose(layer(x), routed(x), atol=1e-5)
    assert layer.base_layer.weight is not routed.base_layer.weight  # the original is untouched


def test_hybrid_model_equals_gated_model(tiny_model):
    hybrid = hybrid_adapters(tiny_model)
    scores = torch.rand(1, tiny_model.config.num_degradations, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.allclose(tiny_model(x, scores), hybrid(x, scores), atol=1e-5)
    assert all(layer.r_shared == 0 for _, layer in adapter_layers(hybrid))


def test_hybrid_bundle_matches_gated_bundle_and_pytorch(tiny_model, hybrid_bundle, gated_bundle):
    manifest = load_manifest(hybrid_bundle)
    assert manifest.mode == "hybrid" and all("scores" in {t.name for t in manifest.graph(c).inputs}
                                              for c in ("encoder", "unet"))
    assert [t.name for t in manifest.graph("unet").inputs] == ["latent", "scores"]
    hybrid, gated = Restorer(hybrid_bundle).restore(IMAGE), Restorer(gated_bundle).restore(IMAGE)
    assert np.abs(hybrid.image - gated.image).max() < 1e-4
    assert np.abs(hybrid.image - _torch_restore(tiny_model, IMAGE)).max() < 1e-4


def test_dense_lora_bundle_matches_pytorch(lora_model, dense_lora_bundle):
    manifest = load_manifest(dense_lora_bundle)
    assert manifest.mode == "dense-lora" and manifest.adapter == "lora"
    assert not any("scores" in {t.name for t in g.inputs} for g in manifest.graphs)
    assert [t.name for t in manifest.graph("unet").inputs] == ["latent"]
    result = Restorer(dense_lora_bundle).restore(IMAGE)
    assert np.abs(result.image - _torch_restore(lora_model, IMAGE)).max() < 1e-4
    # the merged graph has no low-rank branch left: same node count as the base model's UNet
    unet = onnx.load(str(dense_lora_bundle / "unet.onnx"))
    assert not any("lora" in n.name for n in unet.graph.node)


@pytest.mark.parametrize("mode", ["folded", pytest.param("gated", marks=pytest.mark.slow)])
def test_a_wider_deeper_unet_exports_and_matches_pytorch(tiny_buckets, tmp_path, mode):
    """``mordasr-train base --unet-channels/--unet-layers`` shapes go through export and runtime as
    they are: the graphs take the shape from the model."""
    model = make_tiny_model(block_out_channels=(32, 32, 48, 64), layers_per_block=2)
    export_bundle(model, tmp_path / mode, mode, tiny_buckets[:1])
    result = Restorer(tmp_path / mode).restore(IMAGE)
    # folded: one bucket, so the runtime's route is that bucket's centre, folded into the weights
    reference = fold_adapters(model, torch.tensor(tiny_buckets[0].centre)) if mode == "folded" else model
    assert np.abs(result.image - _torch_restore(reference, IMAGE)).max() < 1e-4


def test_modes_allowed_per_adapter(tiny_model, lora_model, tmp_path, tiny_buckets):
    check_mode("mor", "hybrid")
    with pytest.raises(MordasrError, match="dense-lora is the baseline"):
        check_mode("mor", "dense-lora")
    with pytest.raises(MordasrError, match="use --mode dense-lora"):
        check_mode("lora", "folded")
    with pytest.raises(MordasrError, match="unknown mode"):
        check_mode("mor", "sparse")
    with pytest.raises(MordasrError, match="cannot be exported in hybrid"):
        export_bundle(lora_model, tmp_path / "x", "hybrid", tiny_buckets[:1])
    assert not (tmp_path / "x").exists()


def test_weight_packs_hold_only_differing_tensors(folded_bundle):
    manifest = load_manifest(folded_bundle)
    assert {(p.component, p.bucket) for p in manifest.weight_packs} == {
        ("encoder", 0), ("encoder", 1), ("unet", 0), ("unet", 1)}
    for component in ("encoder", "unet"):
        graphs = [onnx.load(str(folded_bundle / manifest.graph(component, b).file)) for b in (0, 1)]
        names = differing_tensors(graphs)
        pack = manifest.weight_pack(component, 1)
        tensors = load_file(str(folded_bundle / pack.file))
        assert sorted(tensors) == sorted(names) and pack.tensors == len(names) > 0
        assert pack.base_graph == manifest.graph(component, 0).file
        # far smaller than the graph: only what MoR changes between buckets travels
        total = sum(i.ByteSize() for i in graphs[0].graph.initializer)
        assert pack.bytes < total


@pytest.mark.parametrize("component", ["encoder", "unet"])
def test_pack_applied_to_bucket0_graph_gives_bucket_k(tiny_model, folded_bundle, component):
    manifest = load_manifest(folded_bundle)
    base = onnx.load(str(folded_bundle / manifest.graph(component, 0).file))
    own = onnx.load(str(folded_bundle / manifest.graph(component, 1).file))
    pack = load_file(str(folded_bundle / manifest.weight_pack(component, 1).file))
    args = example_inputs(tiny_model, component, gated=False, lr_size=12, seed=5)
    feeds = dict(zip([i.name for i in base.graph.input], (a.numpy() for a in args)))
    expected = _session(own).run(None, feeds)[0]
    before = _session(base).run(None, feeds)[0]
    after = _session(apply_pack(base, pack)).run(None, feeds)[0]
    assert np.abs(before - expected).max() > 1e-3  # the buckets really differ
    assert np.array_equal(after, expected)


def test_refit_switching_is_exact_and_never_blends(folded_bundle):
    graphs = Restorer(folded_bundle)
    refit = Restorer(folded_bundle, bucket_switch="refit")
    first = refit.restore(IMAGE, bucket=0).image
    other = refit.restore(IMAGE, bucket=1).image
    again = refit.restore(IMAGE, bucket=0).image
    assert np.array_equal(first, again)  # A -> B -> A gives A exactly: packs are full tensors
    assert np.abs(other - graphs.restore(IMAGE, bucket=1).image).max() < 1e-4
    assert np.abs(first - graphs.restore(IMAGE, bucket=0).image).max() < 1e-4
    assert np.abs(first - other).max() > 1e-3


def test_refit_needs_packs(folded_bundle, tmp_path, tiny_model, tiny_buckets):
    bundle = tmp_path / "nopacks"
    export_bundle(tiny_model, bundle, "folded", tiny_buckets, weight_packs=False)
    assert load_manifest(bundle).weight_packs == []
    with pytest.raises(BundleError, match="no weight packs"):
        Restorer(bundle, bucket_switch="refit")
    copy = tmp_path / "corrupt"
    shutil.copytree(folded_bundle, copy)
    (copy / "packs" / "unet.b1.safetensors").write_bytes(b"junk")
    with pytest.raises(BundleError, match="unet.b1.safetensors does not match its sha256"):
        load_manifest(copy)


def test_differing_tensors_refuses_different_architectures(folded_bundle):
    manifest = load_manifest(folded_bundle)
    encoder = onnx.load(str(folded_bundle / manifest.graph("encoder", 0).file))
    unet = onnx.load(str(folded_bundle / manifest.graph("unet", 0).file))
    with pytest.raises(MordasrError, match="differ in structure"):
        differing_tensors([encoder, unet])


def test_external_data_export(tiny_model, tiny_buckets, tmp_path):
    """Graphs past the size limit keep their weights in one .data file, hashed in the manifest."""
    bundle = tmp_path / "ext"
    manifest = export_bundle(tiny_model, bundle, "gated", tiny_buckets[:1], external_threshold=0)
    for g in manifest.graphs:
        assert g.external_data == g.file + ".data" and (bundle / g.external_data).is_file()
        assert (bundle / g.file).stat().st_size < (bundle / g.external_data).stat().st_size
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["manifest.json"] + [g.file for g in manifest.graphs] + [g.external_data for g in manifest.graphs])
    result = Restorer(bundle).restore(IMAGE)
    assert np.abs(result.image - _torch_restore(tiny_model, IMAGE)).max() < 1e-4
    data = bundle / manifest.graph("unet").external_data
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="unet.onnx.data does not match its sha256"):
        load_manifest(bundle)


def test_large_graph_cleanup_keeps_weights_outside_and_drops_dead_nodes(tmp_path):
    """Graphs past the limit are cleaned by onnx-graphsurgeon without loading their weights."""
    from onnx import TensorProto, helper, numpy_helper

    from mordasr.export.onnx_export import _clean_structure

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("Relu", ["x"], ["dead"]), helper.make_node("Neg", ["dead"], ["dead2"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph(list(reversed(nodes)), "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location="g.onnx.data", size_threshold=0)
    data = (tmp_path / "g.onnx.data").read_bytes()
    _clean_structure(path)
    cleaned = onnx.load(str(path), load_external_data=False)
    assert [n.op_type for n in cleaned.graph.node] == ["MatMul"]
    assert (tmp_path / "g.onnx.data").read_bytes() == data  # weights untouched, still outside
    assert cleaned.graph.initializer[0].data_location == TensorProto.EXTERNAL
    x = np.ones((1, 64), np.float32)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ numpy_helper.to_array(w), rtol=1e-5)


def test_grid_buckets():
    buckets = grid_buckets(4, ["quality", "blur", "noise"])
    assert [b.centre[0] for b in buckets] == [0.125, 0.375, 0.625, 0.875]
    assert all(len(set(b.centre)) == 1 for b in buckets)
    assert buckets[0].label.endswith("mild") and "blur" in buckets[-1].label
    with pytest.raises(ValueError):
        grid_buckets(0, ["quality"])


def test_compare_backends(folded_bundle, tmp_path):
    rows = compare_backends(folded_bundle, IMAGE, ["onnxruntime", "onnxruntime:refit"])
    outputs = [r["output"] for r in rows]
    assert outputs[0] == "router" and outputs[-1] == "image" and len(outputs) == 5
    assert all(0 <= r["mean_abs"] <= r["max_abs"] < 1e-4 for r in rows)
    assert rows[0]["max_abs"] == 0.0  # the router runs the same graph the same way
    assert all(r["passed"] is True and r["atol"] == 1e-3 for r in rows)  # Polygraphy's verdict, FP32 tolerance
    with pytest.raises(MordasrError, match="exactly two"):
        compare_backends(folded_bundle, IMAGE, ["onnxruntime"])
    with pytest.raises(MordasrError, match="unknown backend"):
        compare_backends(folded_bundle, IMAGE, ["onnxruntime", "openvino"])


def test_polygraphy_verdict_fails_beyond_tolerance():
    from mordasr.runtime.compare import polygraphy_verdicts

    a = {"unet": np.zeros((1, 4, 8, 8), np.float32), "image": np.zeros((8, 8, 3), np.float32)}
    b = {"unet": a["unet"] + 5e-4, "image": a["image"] + np.eye(8, dtype=np.float32)[:, :, None] * 0.05}
    verdicts = polygraphy_verdicts(a, b, {"unet": (1e-3, 0.0), "image": (1e-2, 0.0)})
    assert verdicts == {"unet": True, "image": False}


def test_compare_backends_cli(folded_bundle, tmp_path):
    from mordasr.runtime.images import write_image

    write_image(tmp_path / "in.png", IMAGE)
    result = CliRunner().invoke(run_main, [str(tmp_path / "in.png"), "--bundle", str(folded_bundle),
                                           "--compare-backends", "onnxruntime,onnxruntime:refit"])
    assert result.exit_code == 0, result.output
    assert "max abs" in result.output and "unet.b" in result.output
    result = CliRunner().invoke(run_main, [str(tmp_path / "in.png"), "--bundle", str(folded_bundle)])
    assert result.exit_code == 2 and "missing option -o/--output" in result.output
