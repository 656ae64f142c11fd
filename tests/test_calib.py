"""FP16 and INT8 bundles: they run in ONNX Runtime, Q/DQ obeys TensorRT's rules, the report is
measured, calibration is deterministic, and bad input fails cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mordasr.calib.cli import main as calib_main
from mordasr.calib.data import folder_images, split_per_bucket, synthetic_images
from mordasr.calib.gate import DEFAULT_MIN_PSNR
from mordasr.calib.precision_bundle import build_precision_bundle
from mordasr.calib.qdq_lint import lint_qdq
from mordasr.errors import BundleError, MordasrError
from mordasr.model.io import save_checkpoint
from mordasr.runtime import Restorer, load_manifest


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    return save_checkpoint(tiny_model, tmp_path_factory.mktemp("ckpt") / "ckpt")


@pytest.fixture(scope="module")
def int8_bundle(folded_bundle, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8"
    result = CliRunner().invoke(calib_main, [str(folded_bundle), "-o", str(out), "--precision", "int8",
                                             "--checkpoint", str(checkpoint), "--calib-images", "16",
                                             "--eval-images", "2", "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_int8_bundle_runs_and_passes_lint(int8_bundle):
    manifest = load_manifest(int8_bundle)
    assert manifest.precision == "int8"
    assert {g.component: g.precision for g in manifest.graphs}["router"] == "fp32"
    assert manifest.calibration["method"] == "minmax" and manifest.calibration["images"] == 16
    assert set(manifest.calibration["per_bucket"]) == {"0", "1"}
    for g in manifest.graphs:
        model = onnx.load(str(int8_bundle / g.file))
        if g.component == "router":
            continue
        ops = [n.op_type for n in model.graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, g.file
        assert lint_qdq(model) == []
    result = Restorer(int8_bundle).restore(np.random.default_rng(0).uniform(0, 1, (10, 12, 3)).astype(np.float32))
    assert result.image.shape == (40, 48, 3) and np.isfinite(result.image).all()


def test_int8_report_is_measured(int8_bundle):
    report = json.loads((int8_bundle / "accuracy.json").read_text())
    rows = report["rows"]
    assert {(r["bucket"], r["precision"]) for r in rows} == {(0, "fp32"), (0, "int8"), (1, "fp32"), (1, "int8")}
    for r in rows:
        assert r["images"] == 2 and r["finite"] == 1.0
        assert 0 < r["ssim_vs_hr"] <= 1 and -1 <= r["unet_cosine"] <= 1
    fp32 = [r for r in rows if r["precision"] == "fp32"]
    int8 = [r for r in rows if r["precision"] == "int8"]
    # FP32 ONNX matches PyTorch far more closely than INT8 does: the figures are measurements.
    assert all(r["psnr_vs_fp32_torch"] > 60 for r in fp32)
    assert all(a["psnr_vs_fp32_torch"] > b["psnr_vs_fp32_torch"] for a, b in zip(fp32, int8))
    assert "| precision |" in (int8_bundle / "accuracy.md").read_text()


INT8_FLOOR_DB = DEFAULT_MIN_PSNR  # README: every bucket of an INT8 bundle is >= 35 dB from FP32 PyTorch


def test_int8_accuracy_floor_is_the_reports_and_the_report_is_the_bundles(int8_bundle, tiny_model):
    """The floor holds on the report's figures, and those figures are what the INT8 bundle does:
    recomputed here through the runtime on the report's own images, they agree to 0.01 dB."""
    from mordasr.calib.report import evaluation_set

    rows = [r for r in json.loads((int8_bundle / "accuracy.json").read_text())["rows"] if r["precision"] == "int8"]
    assert rows and all(r["psnr_vs_fp32_torch"] >= INT8_FLOOR_DB for r in rows), rows
    restorer = Restorer(int8_bundle)
    lrs, _ = evaluation_set(2, restorer.scale)
    for row in rows:
        psnrs = []
        for lr in lrs:
            x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)[None]))
            with torch.no_grad():
                centre = torch.tensor(restorer.centres[row["bucket"]], dtype=torch.float32).reshape(1, -1)
                reference = tiny_model(x, centre)[0].numpy().transpose(1, 2, 0)
            image = restorer.restore(lr, bucket=row["bucket"]).image
            psnrs.append(10 * np.log10(1 / np.mean((np.clip(image, 0, 1) - reference) ** 2)))
        assert abs(np.mean(psnrs) - row["psnr_vs_fp32_torch"]) < 0.01, (row, psnrs)


@pytest.mark.parametrize("mode", ["folded", pytest.param("gated", marks=pytest.mark.slow),
                                  pytest.param("hybrid", marks=pytest.mark.slow)])
def test_fp16_bundle(mode, request, checkpoint, tmp_path):
    bundle = request.getfixturevalue(f"{mode}_bundle")
    out = tmp_path / "fp16"
    result = CliRunner().invoke(calib_main, [str(bundle), "-o", str(out), "--precision", "fp16",
                                             "--checkpoint", str(checkpoint), "--eval-images", "1", "-q"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out)
    unet = onnx.load(str(out / manifest.graph("unet", 0).file))
    assert any(i.data_type == TensorProto.FLOAT16 for i in unet.graph.initializer)
    assert unet.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # I/O kept float32
    assert manifest.precision == "fp16"
    rows = json.loads((out / "accuracy.json").read_text())["rows"]
    assert all(r["finite"] == 1.0 for r in rows)
    assert all(r["psnr_vs_fp32_torch"] > 35 for r in rows if r["precision"] == "fp16"), [
        (r["precision"], r["psnr_vs_fp32_torch"], r["unet_cosine"]) for r in rows]


def test_calibration_is_deterministic(folded_bundle, tmp_path):
    images = synthetic_images(4, 4, seed=3)
    digests = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        m = build_precision_bundle(folded_bundle, tmp_path / name, "int8", images=images, per_bucket=2, seed=3)
        digests.append([g.sha256 for g in m.graphs])
    assert digests[0] == digests[1]


@pytest.mark.parametrize("method", ["percentile", pytest.param("entropy", marks=pytest.mark.slow)])
def test_calibration_methods_choose_other_activation_ranges(folded_bundle, tmp_path, method):
    """--calib-method percentile|entropy: each calibrates a valid Q/DQ graph whose activation
    scales differ from min/max's; percentile and entropy clip outliers, so their scales are no
    larger (entropy is slow: ONNX Runtime searches its histograms in Python)."""
    from mordasr.calib.qdq_lint import lint_qdq

    images = synthetic_images(4, 4, seed=5)
    scales = {}
    for name in ("minmax", method):
        (tmp_path / name).mkdir()
        manifest = build_precision_bundle(folded_bundle, tmp_path / name, "int8", images=images, per_bucket=2,
                                          seed=5, method=name, components={"unet": "int8"})
        unet = onnx.load(str(tmp_path / name / manifest.graph("unet", 0).file))
        assert lint_qdq(unet) == []
        quantizers = {n.input[1] for n in unet.graph.node if n.op_type == "QuantizeLinear"}
        inits = {i.name: numpy_helper.to_array(i) for i in unet.graph.initializer}
        scales[name] = {q: float(inits[q]) for q in quantizers if inits[q].size == 1}
    common = set(scales["minmax"]) & set(scales[method])
    assert len(common) > 5
    assert any(abs(scales[method][k] - scales["minmax"][k]) > 1e-6 * scales["minmax"][k] for k in common)
    assert all(scales[method][k] <= scales["minmax"][k] * (1 + 1e-6) for k in common)


def test_bad_input(folded_bundle, checkpoint, int8_bundle, tmp_path):
    def run(*args):
        return CliRunner().invoke(calib_main, [str(a) for a in args] + ["--checkpoint", str(checkpoint), "-q"])

    result = run(int8_bundle, "-o", tmp_path / "x", "--precision", "int8")
    assert result.exit_code == 2 and "int8 bundle; calibrate from the fp32" in result.stderr
    result = run(folded_bundle, "-o", tmp_path / "y", "--precision", "int8", "--calib-images", "0")
    assert result.exit_code == 2 and "--calib-images" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run(folded_bundle, "-o", tmp_path / "z", "--precision", "int8", "--calib-dir", tmp_path / "empty")
    assert result.exit_code == 2 and "holds no images" in result.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    result = run(folded_bundle, "-o", tmp_path / "w", "--precision", "int8", "--calib-dir", tmp_path / "bad")
    assert result.exit_code == 2 and "no readable image" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty"]  # nothing half-written


def test_min_psnr_rejects_and_keeps_aside(folded_bundle, checkpoint, tmp_path):
    out = tmp_path / "int8"
    result = CliRunner().invoke(calib_main, [str(folded_bundle), "-o", str(out), "--precision", "int8",
                                             "--checkpoint", str(checkpoint), "--calib-images", "4",
                                             "--min-per-bucket", "2", "--eval-images", "1", "--min-psnr", "200",
                                             "--no-mixed-precision", "-q"])
    assert result.exit_code == 1 and "failed the accuracy gate" in result.stderr
    assert not out.exists() and (tmp_path / "int8.failed" / "accuracy.md").is_file()


def test_folder_images_and_split(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    assert len(folder_images(tmp_path, 2)) == 2
    with pytest.raises(MordasrError, match="does not exist"):
        folder_images(tmp_path / "none", 2)
    scores = np.array([[0.0], [0.1], [0.9], [1.0]])
    assert split_per_bucket(scores, np.array([[0.0], [1.0]]), 2) == [[0, 1], [3, 2]]


def _qdq_model(zero_point: np.ndarray, axis: int, scale: np.ndarray) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w")
    s = numpy_helper.from_array(scale.astype(np.float32), "s")
    z = numpy_helper.from_array(zero_point, "z")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], name="dq", axis=axis),
             helper.make_node("Conv", ["x", "wf"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])], [w, s, z])
    return helper.make_model(graph)


def test_qdq_lint_rules():
    ok = _qdq_model(np.zeros(4, np.int8), 0, np.full(4, 0.1))
    assert lint_qdq(ok) == []
    assert "zero point must be 0" in lint_qdq(_qdq_model(np.ones(4, np.int8), 0, np.full(4, 0.1)))[0]
    assert "TensorRT needs int8" in lint_qdq(_qdq_model(np.zeros(4, np.uint8), 0, np.full(4, 0.1)))[0]
    assert "output-channel axis is 0" in lint_qdq(_qdq_model(np.zeros(4, np.int8), 1, np.full(4, 0.1)))[0]
    assert "positive" in lint_qdq(_qdq_model(np.zeros(4, np.int8), 0, np.array([0.1, 0, 0.1, 0.1])))[0]


def test_bundle_from_other_precision_is_refused(int8_bundle, tmp_path):
    with pytest.raises(BundleError, match="fp32 bundle"):
        build_precision_bundle(int8_bundle, tmp_path, "fp16")


def test_smoothquant_without_its_library_fails_clearly(folded_bundle, tmp_path):
    import importlib.util

    if importlib.util.find_spec("neural_compressor") is not None:
        pytest.skip("neural-compressor is installed; this checks the message shown without it")
    with pytest.raises(MordasrError, match="neural-compressor"):
        build_precision_bundle(folded_bundle, tmp_path, "int8", images=synthetic_images(2, 4), per_bucket=1,
                               smoothquant=True)


def test_int8_weight_packs_switch_buckets(int8_bundle):
    """Packs of a reduced-precision bundle carry its converted tensors (INT8 weights, per-bucket
    scales)."""
    manifest = load_manifest(int8_bundle)
    assert {(p.component, p.bucket) for p in manifest.weight_packs} == {(c, b) for c in ("encoder", "unet")
                                                                          for b in (0, 1)}
    from safetensors.numpy import load_file

    from mordasr.graphs.packs import apply_pack

    base = onnx.load(str(int8_bundle / "unet.b0.onnx"))
    own = onnx.load(str(int8_bundle / "unet.b1.onnx"))
    pack = load_file(str(int8_bundle / manifest.weight_pack("unet", 1).file))
    assert any(v.ndim == 0 for v in pack.values())  # per-tensor activation scales keep their shape
    latent = {"latent": np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)}

    def run(model):
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, latent)[0]

    assert np.array_equal(run(apply_pack(base, pack)), run(own))
    # ONNX Runtime's initializer overrides do not reach Q/DQ weights: refused, never wrong
    with pytest.raises(MordasrError, match="not supported for INT8 bundles"):
        Restorer(int8_bundle, bucket_switch="refit")


def test_fp16_routing_stays_float32_without_round_trips(gated_bundle):
    """Every node computed from the scores alone runs in FP32 and reads FP32 tensors directly:
    no Cast-to-FP16/Cast-to-FP32 pair sits between two routing nodes."""
    from mordasr.calib.fp16 import convert_fp16, routing_nodes

    model = onnx.load(str(gated_bundle / "unet.onnx"))
    routing = set(routing_nodes(model))
    assert any("router" in n for n in routing) and len(routing) > 50
    converted = convert_fp16(model)
    producer = {o: n for n in converted.graph.node for o in n.output}
    for node in converted.graph.node:
        if node.name not in routing:
            continue
        for name in node.input:
            cast = producer.get(name)
            if cast is not None and cast.op_type == "Cast":
                inner = producer.get(cast.input[0])
                assert not (inner is not None and inner.op_type == "Cast"), f"round trip into {node.name}"
    onnx.checker.check_model(converted, full_check=True)  # topologically sorted and valid


@pytest.mark.slow
def test_calib_finds_the_source_checkpoint_from_any_directory(checkpoint, tmp_path, monkeypatch):
    """The export records the checkpoint absolutely and relative to the bundle, so mordasr-calib
    without --checkpoint works from another working directory, and after moving both together."""
    import shutil

    from mordasr.export.cli import main as export_main

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(checkpoint, work / "ckpt")
    monkeypatch.chdir(work)
    result = CliRunner().invoke(export_main, ["ckpt", "-o", "bundle", "--mode", "gated", "-q"])
    assert result.exit_code == 0, result.output
    source = load_manifest(work / "bundle").source
    assert Path(source["checkpoint"]).is_absolute() and source["checkpoint_from_bundle"] == "../ckpt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(calib_main, [str(work / "bundle"), "-o", "fp16", "--precision", "fp16",
                                             "--eval-images", "1", "-q"])
    assert result.exit_code == 0, result.output
    shutil.move(str(work), str(tmp_path / "moved"))  # bundle and checkpoint moved together
    result = CliRunner().invoke(calib_main, [str(tmp_path / "moved" / "bundle"), "-o", "fp16b", "--precision",
                                             "fp16", "--eval-images", "1", "-q"])
    assert result.exit_code == 0, result.output


def test_starved_int8_calibration_is_refused_before_anything_is_written(folded_bundle, checkpoint, tmp_path):
    """Fewer calibration images than every bucket needs: refused with the minimum named, and
    nothing at OUT, at OUT.failed or in a staging folder beside them."""
    result = CliRunner().invoke(calib_main, [str(folded_bundle), "-o", str(tmp_path / "int8"), "--precision", "int8",
                                             "--checkpoint", str(checkpoint), "--calib-images", "8", "-q"])
    assert result.exit_code == 2 and "needs at least 16 images" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_every_bucket_calibrates_on_its_minimum(int8_bundle):
    """Each bucket's graphs calibrate on --min-per-bucket (16) images, its nearest, however few the
    router sends it; the manifest records both counts."""
    calibration = load_manifest(int8_bundle).calibration
    assert {b: len(idx) for b, idx in calibration["per_bucket"].items()} == {"0": 16, "1": 16}
    assert sum(calibration["routed_per_bucket"].values()) == 16
    assert calibration["gate"] == {"min_psnr": 35.0, "max_hr_loss": 0.15} and calibration["gate_failures"] == []


FRAGILE = "/unet/up_blocks.3/resnets.1/conv2/Conv"


def _fragile_checkpoint(tmp_path):
    """The test model with one layer INT8 cannot hold: conv2 of the last UNet block gets a weight
    column 300x its largest weight on an input channel that is always zero (its GroupNorm scale
    and shift are 0), so FP32 is unchanged while the per-channel INT8 scale rounds every other
    weight of that layer to zero."""
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    block = model.unet.up_blocks[3].resnets[1]
    with torch.no_grad():
        block.norm2.weight[0] = 0
        block.norm2.bias[0] = 0
        weight = block.conv2.base_layer.weight
        weight[:, 0] = 300 * weight.abs().max()
    return model, save_checkpoint(model, tmp_path / "fragile")


@pytest.mark.slow
def test_mixed_precision_keeps_the_fragile_layer_float(tiny_buckets, tmp_path):
    from mordasr.calib.calibrate import calibrate
    from mordasr.calib.gate import Gate
    from mordasr.errors import AccuracyGateFailed
    from mordasr.export.bundle import export_bundle

    model, checkpoint = _fragile_checkpoint(tmp_path)
    export_bundle(model, tmp_path / "fp32", "folded", tiny_buckets[:1])
    # The test model's UNet barely moves its output (INT8 of every UNet layer stays ~60 dB from
    # FP32), so the floor is raised to where the fragile layer (~47 dB) breaks it.
    common = dict(checkpoint=checkpoint, calib_images=4, calib_dir=None, method="minmax", smoothquant=False,
                  keep_float=("conv_in", "conv_out", "time_emb"), gate=Gate(min_psnr=52), eval_images=1, seed=0,
                  force=False, quiet=True, components={"unet": "int8", "encoder": "fp32", "decoder": "fp32"},
                  min_per_bucket=2)
    with pytest.raises(AccuracyGateFailed, match="below the 52 dB floor"):
        calibrate(tmp_path / "fp32", tmp_path / "plain", "int8", mixed_precision=False, **common)
    assert not (tmp_path / "plain").exists() and (tmp_path / "plain.failed" / "manifest.json").is_file()
    rows = calibrate(tmp_path / "fp32", tmp_path / "mixed", "int8", **common)
    assert all(r["psnr_vs_fp32_torch"] >= 52 for r in rows)
    manifest = load_manifest(tmp_path / "mixed")
    kept = manifest.calibration["mixed_precision"]
    assert {key: info["float_layers"] for key, info in kept.items()} == {"unet.b0": [FRAGILE]}
    assert all(info["latency_ratio"] > 0 for info in kept.values())
    from mordasr.calib.int8 import quantized_layers

    for key in kept:
        graph = onnx.load(str(tmp_path / "mixed" / next(g.file for g in manifest.graphs if g.key == key)))
        assert FRAGILE not in quantized_layers(graph) and len(quantized_layers(graph)) > 20
        assert lint_qdq(graph) == []
    assert FRAGILE in (tmp_path / "mixed" / "accuracy.md").read_text()


def test_int8_graphs_run_on_integer_kernels_on_cpu(int8_bundle, tmp_path):
    """Every quantized Conv of the INT8 graphs becomes a QLinearConv in ONNX Runtime's optimized
    CPU graph once the runtime hands it uint8 activations (runtime/qdq_cpu.py), and a SiLU after
    one runs as QLinearSigmoid/QLinearMul; the rewrite changes no value."""
    import onnxruntime as ort

    from mordasr.calib.int8 import quantized_layers
    from mordasr.runtime.qdq_cpu import cpu_graph, uint8_activations

    manifest = load_manifest(int8_bundle)
    for component in ("encoder", "unet", "decoder"):
        graph = manifest.graph(component, 0)
        model = onnx.load(str(int8_bundle / graph.file))
        layers = set(quantized_layers(model))
        convs = [n for n in model.graph.node if n.name in layers and n.op_type == "Conv"]
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{component}.opt.onnx")
        ort.InferenceSession(cpu_graph(int8_bundle / graph.file), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
        assert ops.count("QLinearConv") == len(convs) > 0, (component, ops.count("QLinearConv"), len(convs))
        if component != "unet":  # the UNet's SiLUs follow its norms, not its convs
            assert "QLinearSigmoid" in ops and "QLinearMul" in ops
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        feeds = {i.name: np.random.default_rng(1).standard_normal(
            [d if isinstance(d, int) else 8 for d in i.shape]).astype(np.float32)
            for i in ort.InferenceSession(str(int8_bundle / graph.file), plain).get_inputs()}
        before = ort.InferenceSession(str(int8_bundle / graph.file), plain).run(None, feeds)[0]
        after = ort.InferenceSession(uint8_activations(model).SerializeToString(), plain).run(None, feeds)[0]
        assert np.array_equal(before, after)


def test_layers_kept_float_are_shared_by_a_components_bucket_graphs():
    """With weight packs every bucket graph of a component keeps the same layers float (one
    structure, one refittable engine); without them each graph keeps its own."""
    from mordasr.calib.mixed_precision import plan_float_layers

    ranked = {"unet.b0": ["a", "b", "c"], "unet.b1": ["c", "d"]}
    components = {"unet.b0": "unet", "unet.b1": "unet", "encoder.b0": "encoder"}
    assert plan_float_layers(ranked, 1, components, False) == {"unet.b0": ["a"], "unet.b1": ["c"]}
    assert plan_float_layers(ranked, 2, components, True) == {"unet.b0": ["a", "b", "c", "d"],
                                                              "unet.b1": ["a", "b", "c", "d"]}


def test_calibration_images_smaller_than_the_profile_are_refused(folded_bundle, checkpoint, tmp_path):
    from PIL import Image

    (tmp_path / "small").mkdir()
    for i in range(16):
        Image.new("RGB", (4, 4), (i * 10, 0, 0)).save(tmp_path / "small" / f"{i}.png")
    minimum = load_manifest(folded_bundle).profile["min"]
    assert minimum[0] // 4 > 4  # the bundle's smallest LR input is larger than these images
    result = CliRunner().invoke(calib_main, [str(folded_bundle), "-o", str(tmp_path / "int8"), "--precision", "int8",
                                             "--checkpoint", str(checkpoint), "--calib-dir", str(tmp_path / "small"),
                                             "--calib-images", "16", "-q"])
    assert result.exit_code == 2 and "16 of 16 images are smaller than the bundle's smallest input" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]
