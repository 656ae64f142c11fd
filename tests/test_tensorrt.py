"""TensorRT: the pure logic (versions -> flags, pixels -> profiles, names, LRU, lint, trtexec
script) runs everywhere; engine building and the engine backend run only where ``tensorrt``
imports, and are skipped with the reason elsewhere (nothing stands in for TensorRT)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import replace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mordasr.errors import BundleError, MordasrError
from mordasr.export.engines import EngineOptions, engine_graphs
from mordasr.export.lint import check_bundle_graphs, lint_graph_file, lint_model, op_table
from mordasr.export.tensorrt_config import build_settings, format_shape, parse_size, profile_shapes
from mordasr.export.trtexec import write_trtexec_script
from mordasr.runtime import load_manifest
from mordasr.runtime.backends.onnxruntime import provider_chain
from mordasr.runtime.engine_names import (LRUCache, TensorRTVersion, compute_capability_tag,
                                          engine_file_name, engine_mismatch)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt is not installed on this machine "
                                    "(no TensorRT wheel can be installed here); engine paths run where it is")


# -- versions and flags ---------------------------------------------------------------------------

def test_version_parsing():
    assert TensorRTVersion.parse("10.3.0.26") == TensorRTVersion(10, 3, 0)
    assert str(TensorRTVersion.parse("11")) == "11.0.0"
    assert TensorRTVersion.parse("11.3.1") > TensorRTVersion.parse("11.2.9")
    with pytest.raises(MordasrError, match="not supported"):
        TensorRTVersion.parse("8.6.1")
    with pytest.raises(MordasrError, match="cannot read"):
        TensorRTVersion.parse("latest")


@pytest.mark.parametrize("version, precision, typed, network, builder", [
    ("10.3", "fp32", None, [], []),
    ("10.3", "fp16", None, [], ["FP16"]),
    ("10.3", "int8", None, [], ["INT8"]),  # Q/DQ graph, float remainder stays FP32 as calibrated
    ("10.8", "fp16", True, ["STRONGLY_TYPED"], []),
    ("11.0", "fp16", None, [], []),  # strongly typed always: precision from the graph
    ("11.4", "int8", None, [], []),
])
def test_build_settings_per_version(version, precision, typed, network, builder):
    settings = build_settings(TensorRTVersion.parse(version), precision, strongly_typed=typed)
    assert settings.network_flags == network and settings.builder_flags == builder


def test_refit_flags_per_version():
    assert build_settings(TensorRTVersion(10, 3), "fp16", refittable=True).builder_flags == ["FP16", "REFIT"]
    assert build_settings(TensorRTVersion(11, 2), "fp32", refittable=True).builder_flags == ["REFIT"]
    late = build_settings(TensorRTVersion(11, 3), "fp32", refittable=True)
    assert late.builder_flags == ["REFIT_INDIVIDUAL"] and late.refit_only_packs
    assert any("bias" in n for n in late.notes)
    assert late.trtexec_args() == ["--refit"]
    assert build_settings(TensorRTVersion(10, 3), "int8", True, True).trtexec_args() == ["--stronglyTyped", "--refit"]
    with pytest.raises(MordasrError, match="no weak typing"):
        build_settings(TensorRTVersion(11, 0), "fp16", strongly_typed=False)
    with pytest.raises(MordasrError, match="unknown precision"):
        build_settings(TensorRTVersion(10, 0), "fp8")


# -- profiles and names ---------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("512") == (512, 512)
    assert parse_size("768x512") == (512, 768)
    for bad in ("", "12x", "-4", "a"):
        with pytest.raises(MordasrError, match="bad size"):
            parse_size(bad)


def test_profiles_from_output_pixels(folded_bundle):
    manifest = load_manifest(folded_bundle)  # tiny: scale 4, latent /4, LR sides multiples of 2
    assert (manifest.scale, manifest.latent_downsample) == (4, 4)
    encoder = profile_shapes(manifest, manifest.graph("encoder", 0), "64", "128x96", "250")
    assert encoder == {"image": [[1, 3, 16, 16], [1, 3, 24, 32], [1, 3, 64, 64]]}  # max rounds up
    unet = profile_shapes(manifest, manifest.graph("unet", 0), 64, 128, 256, batch=(1, 2, 4))
    assert unet == {"latent": [[1, 16, 16, 16], [2, 16, 32, 32], [4, 16, 64, 64]]}
    router = profile_shapes(manifest, manifest.graph("router"), 64, 128, 256)
    assert router == {"image": [[1, 3, 32, 32]] * 3}  # the router's size is fixed
    with pytest.raises(MordasrError, match="min <= opt <= max"):
        profile_shapes(manifest, manifest.graph("unet", 0), 512, 256, 1024)
    assert format_shape("latent", [1, 16, 8, 8]) == "latent:1x16x8x8"


def test_profiles_respect_lr_multiple(folded_bundle):
    manifest = replace(load_manifest(folded_bundle), lr_multiple=8, scale=4, latent_downsample=8)
    shapes = profile_shapes(manifest, manifest.graph("encoder", 0), 100, 100, 100)["image"]
    assert shapes[0][2] % 8 == 0 and shapes[2][2] % 8 == 0 and shapes[0][2] <= 25 <= shapes[2][2]


def test_engine_names_and_mismatch(folded_bundle):
    graph = load_manifest(folded_bundle).graph("unet", 1)
    assert compute_capability_tag("8.7") == "sm87"
    assert engine_file_name(graph, "8.7", "10.3.0.26") == "engines/unet.b1.sm87.trt10.3.0.fp32.plan"
    assert engine_mismatch("8.7", "10.3.0", "8.7", "10.3.0.1") is None
    why = engine_mismatch("8.6", "10.3.0", "8.7", "10.7.0")
    assert "compute capability 8.6" in why and "TensorRT 10.3.0" in why and "rebuild" in why
    with pytest.raises(MordasrError, match="bad compute capability"):
        compute_capability_tag("sm_87")


def test_engine_graphs_refittable_folded_builds_bucket0_only(folded_bundle, gated_bundle):
    manifest = load_manifest(folded_bundle)
    assert [g.key for g in engine_graphs(manifest, refittable=False)] == [g.key for g in manifest.graphs]
    assert [g.key for g in engine_graphs(manifest, refittable=True)] == [
        "router", "encoder.b0", "unet.b0", "decoder"]
    gated = load_manifest(gated_bundle)
    assert len(engine_graphs(gated, refittable=True)) == 4


def test_lru_cache_frees_the_least_recently_used():
    closed = []
    cache = LRUCache(2, close=closed.append)
    loads = []
    for key in ["a", "b", "a", "c", "b"]:
        cache.get(key, lambda k=key: loads.append(k) or f"engine-{k}")
    assert loads == ["a", "b", "c", "b"] and closed == ["engine-b", "engine-a"]
    assert cache.keys() == ["c", "b"] and len(cache) == 2
    with pytest.raises(ValueError):
        LRUCache(0)


def test_ort_provider_chain(tmp_path):
    assert provider_chain("onnxruntime", "fp32", tmp_path) == ["CPUExecutionProvider"]
    assert provider_chain("ort-cuda", "fp16", tmp_path) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda, cpu = provider_chain("ort-trt", "int8", tmp_path)
    assert trt[0] == "TensorrtExecutionProvider" and cuda == "CUDAExecutionProvider"
    assert trt[1]["trt_engine_cache_enable"] and trt[1]["trt_engine_cache_path"] == str(tmp_path)
    assert trt[1]["trt_int8_enable"] and not trt[1]["trt_fp16_enable"]


def test_gpu_backends_fail_clearly_without_their_provider(folded_bundle):
    import onnxruntime

    from mordasr.runtime import Restorer

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(MordasrError, match="ort-cuda needs CUDAExecutionProvider.*onnxruntime-gpu"):
        Restorer(folded_bundle, backend="ort-cuda")


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where tensorrt is missing")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(folded_bundle):
    from mordasr.runtime import Restorer

    with pytest.raises(MordasrError, match="tensorrt backend needs TensorRT"):
        Restorer(folded_bundle, backend="tensorrt")


# -- lint ------------------------------------------------------------------------------------------

def _graph(nodes, inits=(), opset=17, extra_inputs=()):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])] + list(extra_inputs)
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_op_tables_name_their_source():
    for major in (10, 11):
        table = op_table(major)
        assert "operators.md" in table["source"] and table["url"].startswith("https://")
        assert {"Conv", "MatMul", "TopK", "Softmax"} <= set(table["supported"])
        assert {"NonZero", "If"} <= set(table["supported"])  # parsed, but the hazard rule rejects them
    assert "DFT" in op_table(10)["unsupported"] and op_table(11)["since"]["DFT"] == "11.2"
    with pytest.raises(MordasrError, match="no operator table"):
        op_table(9)


def test_lint_rejects_unsupported_ops_with_the_node_name():
    dft = _graph([helper.make_node("DFT", ["x"], ["y"], name="fam/rfft")], opset=17)
    issues = lint_model(dft, "adaptir.onnx", "10.3")
    assert len(issues) == 1 and str(issues[0]) == (
        "adaptir.onnx: node fam/rfft (DFT): not supported by TensorRT 10's ONNX parser")
    assert "needs TensorRT 11.2" in str(lint_model(dft, "a.onnx", "11.0")[0])
    assert lint_model(dft, "a.onnx", "11.2") == []


def test_lint_rejects_routing_hazards_and_restrictions():
    k_const = numpy_helper.from_array(np.array([2], np.int64), "k")
    k_input = helper.make_tensor_value_info("k_dyn", TensorProto.INT64, [1])
    model = _graph([
        helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
        helper.make_node("TopK", ["x", "k"], ["v1", "i1"], name="topk_ok"),
        helper.make_node("TopK", ["x", "k_dyn"], ["v2", "i2"], name="topk_dynamic"),
        helper.make_node("Resize", ["x", "", "sc"], ["r"], name="up", mode="cubic"),
        helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.example"),
    ], inits=[k_const, numpy_helper.from_array(np.ones(2, np.float32), "sc")], extra_inputs=[k_input])
    messages = [str(i) for i in lint_model(model, "g.onnx", "10")]
    assert any("nz (NonZero): data-dependent output shape" in m for m in messages)
    assert any("topk_dynamic (TopK): k is not a build-time constant" in m for m in messages)
    assert not any("topk_ok" in m for m in messages)
    assert any("up (Resize): Resize mode 'cubic'" in m for m in messages)
    assert any("custom (Relu): custom domain" in m for m in messages)
    old = _graph([helper.make_node("Relu", ["x"], ["y"])], opset=8)
    assert "outside TensorRT 10's range 9..24" in str(lint_model(old, "g.onnx", "10")[0])


def test_lint_rejects_shapes_taken_from_tensor_values():
    model = _graph([
        # shape from Shape(x): known once the input shape is, fine for an engine profile
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape_of_x"),
        helper.make_node("Reshape", ["x", "x_shape"], ["same"], name="reshape_by_shape"),
        # shape from the values of x (e.g. a routed count): only known at run time
        helper.make_node("ReduceMax", ["x"], ["peak"], name="peak", keepdims=0),
        helper.make_node("Cast", ["peak"], ["count"], name="count", to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["count", "axes"], ["count1"], name="count1"),
        helper.make_node("ConstantOfShape", ["count1"], ["ones"], name="ones_by_count"),
        helper.make_node("Expand", ["x", "count1"], ["y"], name="expand_by_count"),
    ], inits=[numpy_helper.from_array(np.array([0], np.int64), "axes")])
    messages = [str(i) for i in lint_model(model, "g.onnx", "10")]
    assert not any("reshape_by_shape" in m for m in messages)
    assert any("ones_by_count (ConstantOfShape): data-dependent shape: input 'count1'" in m for m in messages)
    assert any("expand_by_count (Expand): data-dependent shape" in m for m in messages)
    assert len(messages) == 2


@pytest.mark.parametrize("mode", ["folded", "gated", "hybrid", "dense_lora"])
def test_every_exported_graph_passes_the_lint(mode, request):
    bundle = request.getfixturevalue(f"{mode}_bundle")
    manifest = load_manifest(bundle)
    assert manifest.source["tensorrt_lint"] == [10, 11]
    for g in manifest.graphs:
        assert lint_graph_file(bundle / g.file) == [], g.file
        ops = {n.op_type for n in onnx.load(str(bundle / g.file)).graph.node}
        assert "Resize" not in ops or g.component != "encoder"  # bicubic upsample is pad + conv


def test_export_fails_on_a_graph_tensorrt_cannot_parse(tmp_path):
    onnx.save(_graph([helper.make_node("DFT", ["x"], ["y"], name="spectrum")]), str(tmp_path / "bad.onnx"))
    with pytest.raises(MordasrError, match=r"TensorRT lint failed: bad.onnx: node spectrum \(DFT\).*1 more"):
        check_bundle_graphs(tmp_path, ["bad.onnx"])


# -- trtexec script ---------------------------------------------------------------------------------

FAKE_TRTEXEC = """#!/usr/bin/env bash
# Records its arguments and writes the --saveEngine file: checks the script's own logic only.
echo "$@" >> "$TRTEXEC_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) echo plan > "${a#--saveEngine=}";; esac; done
"""


def _run_script(bundle, tmp_path, trt_version):
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    log = tmp_path / f"log{trt_version}"
    env = dict(os.environ, TRTEXEC=str(fake), SM="87", TRT_VERSION=trt_version, TRTEXEC_LOG=str(log))
    proc = subprocess.run(["bash", str(bundle / "build_engines.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_trtexec_script(folded_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    manifest = load_manifest(bundle)
    options = EngineOptions(min_size="64", opt_size="128", max_size="256", refittable=True)
    path = write_trtexec_script(bundle, manifest, options)
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    assert "--maxShapes=latent:1x16x64x64" in text and "unet.b1.onnx" not in text  # refit reaches b1
    proc, calls = _run_script(bundle, tmp_path, "10.3.0")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4 and all("--refit" in c and "--skipInference" in c for c in calls)
    assert not any("--fp16" in c for c in calls)  # fp32 bundle
    for g in engine_graphs(manifest, refittable=True):  # the runtime finds what the script wrote
        assert (bundle / engine_file_name(g, "8.7", "10.3.0")).read_text() == "plan\n"
    assert not list(bundle.glob("engines/*.partial"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_trtexec_script_flags_follow_the_tensorrt_major(folded_bundle, tmp_path):
    from mordasr.calib.bundle import build_precision_bundle

    bundle = tmp_path / "fp16"
    bundle.mkdir()
    manifest = build_precision_bundle(folded_bundle, bundle, "fp16")
    write_trtexec_script(bundle, manifest, EngineOptions())
    _, calls10 = _run_script(bundle, tmp_path, "10.3.0")
    _, calls11 = _run_script(bundle, tmp_path, "11.4.0")
    router10 = next(c for c in calls10 if "router.onnx" in c)
    unet10 = next(c for c in calls10 if "unet.b0.onnx" in c)
    assert "--fp16" in unet10 and "--fp16" not in router10  # the router stays FP32
    assert not any("--fp16" in c for c in calls11)  # TensorRT 11 removed the flag
    proc, _ = _run_script(bundle, tmp_path, "8.6.1")
    assert proc.returncode == 2 and "too old" in proc.stderr


def test_trtexec_script_without_trtexec_or_gpu_says_what_to_set(gated_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(gated_bundle, bundle)
    write_trtexec_script(bundle, load_manifest(bundle), EngineOptions())
    env = dict(os.environ, PATH="/usr/bin:/bin", TRTEXEC="")
    proc = subprocess.run(["bash", str(bundle / "build_engines.sh")], env=env, capture_output=True, text=True)
    if shutil.which("trtexec") is None and not os.path.exists("/usr/src/tensorrt/bin/trtexec"):
        assert proc.returncode == 2 and "trtexec not found" in proc.stderr


def test_export_cli_writes_the_script_and_reports_missing_tensorrt(tiny_model, tmp_path):
    from mordasr.export.cli import main as export_main
    from mordasr.model.io import save_checkpoint

    checkpoint = save_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    args = [str(checkpoint), "-o", str(out), "--mode", "gated", "--bucket-placement", "grid",
            "--max-size", "512", "-q"]
    result = CliRunner().invoke(export_main, args + (["--engines"] if not HAS_TENSORRT else []))
    assert "build_engines.sh" in (out / "build_engines.sh").read_text()
    assert "--maxShapes=image:1x3x128x128" in (out / "build_engines.sh").read_text()
    if not HAS_TENSORRT:
        assert result.exit_code == 2 and "tensorrt is not installed" in result.output
        assert "build_engines.sh" in result.output
    bad = CliRunner().invoke(export_main, [str(checkpoint), "-o", str(tmp_path / "x"), "--max-size", "big"])
    assert bad.exit_code == 2 and "bad size 'big'" in bad.output


# -- engines (only where TensorRT imports) ------------------------------------------------------------

@needs_tensorrt
def test_engines_build_and_match_onnxruntime(folded_bundle, tmp_path):
    from mordasr.export.engines import build_engines
    from mordasr.runtime import Restorer

    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    built = build_engines(bundle, EngineOptions(min_size="32", opt_size="64", max_size="128", refittable=True))
    assert {e.graph for e in built} == {"router", "encoder.b0", "unet.b0", "decoder"}
    image = np.random.default_rng(0).uniform(0, 1, (16, 16, 3)).astype(np.float32)
    reference = Restorer(bundle)
    engines = Restorer(bundle, backend="tensorrt", bucket_switch="refit")
    for bucket in (1, 0, 1):
        diff = np.abs(engines.restore(image, bucket=bucket).image - reference.restore(image, bucket=bucket).image)
        assert diff.max() < 1e-2


@needs_tensorrt
def test_engine_for_another_device_is_refused(folded_bundle, tmp_path):
    from mordasr.runtime import Restorer
    from mordasr.runtime.manifest import EngineSpec

    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    manifest = load_manifest(bundle)
    fake = EngineSpec("router", "engines/router.sm10.trt10.0.0.fp32.plan", "0" * 64, "1.0", "10.0.0", "fp32", {})
    replace(manifest, engines=[fake]).write(bundle)
    with pytest.raises(BundleError, match="compute capability 1.0.*rebuild"):
        Restorer(bundle, backend="tensorrt").restore(np.zeros((8, 8, 3), np.float32))
