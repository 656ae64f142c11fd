"""TensorRT: the pure logic (versions -> flags, pixels -> profiles, names, LRU, lint, the build
and verify scripts, bucket switching, CUDA-graph lifetime) runs everywhere; engine building and the
engine backend run only where ``tensorrt``
imports, and are skipped with the reason elsewhere (nothing stands in for TensorRT)."""

from __future__ import annotations

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
from mordasr.export.engine_script import write_engine_scripts
from mordasr.graphs.lint import check_bundle_graphs, lint_graph_file, lint_model, op_table
from mordasr.lazy import has_module
from mordasr.runtime import load_manifest
from mordasr.runtime.backends.onnxruntime import provider_chain
from mordasr.runtime.engine_names import (
    LRUCache,
    TensorRTVersion,
    compute_capability_tag,
    engine_file_name,
    engine_mismatch,
)
from mordasr.runtime.trt_settings import (
    EngineOptions,
    build_settings,
    engine_graphs,
    graph_refittable,
    parse_size,
    profile_advice,
    profile_shapes,
)

HAS_TENSORRT = has_module("tensorrt")
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
    # trtexec's --refit sets REFIT, a different engine: refused (defect 2); Polygraphy gets the
    # flag and the marks through the postprocess script
    assert late.needs_postprocess and late.polygraphy_args() == []
    with pytest.raises(MordasrError, match="REFIT_INDIVIDUAL"):
        late.trtexec_args()
    early = build_settings(TensorRTVersion(10, 3), "int8", True, True)
    assert early.trtexec_args() == ["--stronglyTyped", "--refit"]
    assert early.polygraphy_args() == ["--strongly-typed", "--refittable"]
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
    manifest = load_manifest(folded_bundle)  # tiny: scale 4, latent /2, LR sides multiples of 4
    assert (manifest.scale, manifest.latent_downsample, manifest.lr_multiple) == (4, 2, 4)
    encoder = profile_shapes(manifest, manifest.graph("encoder", 0), "64", "128x96", "250")
    assert encoder == {"image": [[1, 3, 16, 16], [1, 3, 24, 32], [1, 3, 64, 64]]}  # max rounds up
    unet = profile_shapes(manifest, manifest.graph("unet", 0), 64, 128, 256)
    assert unet == {"latent": [[1, 8, 32, 32], [1, 8, 64, 64], [1, 8, 128, 128]]}  # max_batch 1
    router = profile_shapes(manifest, manifest.graph("router"), 64, 128, 256)
    # the router's size is fixed; it takes the 4 windows mordasr-run scores of a photograph
    assert router == {"image": [[1, 3, 64, 64], [4, 3, 64, 64], [4, 3, 64, 64]]}
    batched = replace(manifest, max_batch=3)
    assert profile_shapes(batched, batched.graph("unet", 0), 64, 128, 256)["latent"][2][0] == 3
    assert profile_shapes(batched, batched.graph("router"), 64, 128, 256)["image"][2][0] == 12
    with pytest.raises(MordasrError, match="min <= opt <= max"):
        profile_shapes(manifest, manifest.graph("unet", 0), 512, 256, 1024)


def test_profiles_respect_lr_multiple(folded_bundle):
    manifest = replace(load_manifest(folded_bundle), lr_multiple=8, scale=4, latent_downsample=8)
    shapes = profile_shapes(manifest, manifest.graph("encoder", 0), 100, 100, 100)["image"]
    assert shapes[0][2] % 8 == 0 and shapes[2][2] % 8 == 0 and shapes[0][2] <= 25 <= shapes[2][2]


def test_profile_advice_names_the_fix():
    profile = [[1, 3, 16, 16], [1, 3, 32, 32], [2, 3, 64, 64]]
    assert "a batch of 4, the engine takes 2" in profile_advice("encoder.b0", "image", (4, 3, 32, 32), profile, 2)
    assert "--max-batch" in profile_advice("encoder.b0", "image", (4, 3, 32, 32), profile, 2)
    big = profile_advice("encoder.b0", "image", (1, 3, 80, 32), profile, 2)
    assert "larger than its largest size; tile smaller (--tile) or re-export with a larger --max-size" in big
    assert "re-export with a smaller --min-size" in profile_advice("unet.b0", "image", (1, 3, 8, 32), profile, 2)
    assert "((1, 3, 16, 16) .. (2, 3, 64, 64))" in big


def test_only_graphs_whose_weights_differ_between_buckets_are_refittable(folded_bundle, gated_bundle):
    manifest = load_manifest(folded_bundle)
    refittable = [g.key for g in manifest.graphs if graph_refittable(manifest, g, True)]
    assert refittable == ["encoder.b0", "unet.b0"]
    assert not any(graph_refittable(manifest, g, False) for g in manifest.graphs)
    gated = load_manifest(gated_bundle)
    assert not any(graph_refittable(gated, g, True) for g in gated.graphs)  # no packs: nothing to refit


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

    with pytest.raises(MordasrError, match="tensorrt backend needs tensorrt.*pip install tensorrt"):
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


# -- build_engines.sh / verify_engines.sh ------------------------------------------------------------

FAKE_BUILDER = """#!/usr/bin/env bash
# Records its arguments and writes the engine it was asked for: checks the script's own logic only.
echo "${MORDASR_REFIT_GRAPH:+MORDASR_REFIT_GRAPH=$MORDASR_REFIT_GRAPH }$(basename "$0") $@" >> "$BUILD_LOG"
if [ "${1:-}" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec"; exit 0; fi
out=""; prev=""
for a in "$@"; do
    case "$a" in --saveEngine=*) out="${a#--saveEngine=}";; esac
    [ "$prev" = -o ] && out="$a"
    prev="$a"
done
[ -n "$out" ] && echo plan > "$out"
exit 0
"""


def _fake_tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("trtexec", "polygraphy"):
        (bin_dir / name).write_text(FAKE_BUILDER)
        (bin_dir / name).chmod(0o755)
    # python3 that cannot import tensorrt, so BUILDER=auto falls back to trtexec where asked
    return bin_dir


def _run_script(bundle, tmp_path, trt_version, builder="polygraphy", **env_extra):
    bin_dir = _fake_tools(tmp_path)
    log = tmp_path / f"log-{builder}-{trt_version}"
    log.unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", BUILDER=builder, SM="87", BUILD_LOG=str(log),
               TRTEXEC=str(bin_dir / "trtexec"), **env_extra)
    if trt_version is not None:
        env["TRT_VERSION"] = trt_version
    proc = subprocess.run(["bash", str(bundle / "build_engines.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    calls = [c for c in log.read_text().splitlines() if " --help" not in c] if log.exists() else []
    return proc, calls


@pytest.fixture
def refit_bundle(folded_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    options = EngineOptions(min_size="64", opt_size="128", max_size="256", refittable=True, tactic_dram_mb=1024)
    write_engine_scripts(bundle, load_manifest(bundle), options)
    return bundle


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_script_builds_with_polygraphy_what_the_python_builder_builds(refit_bundle, tmp_path):
    bundle = refit_bundle
    for script in ("build_engines.sh", "verify_engines.sh"):
        assert os.access(bundle / script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(bundle / script)], capture_output=True).returncode == 0
    manifest = load_manifest(bundle)
    latent = manifest.graph("unet", 0).inputs[0]
    proc, calls = _run_script(bundle, tmp_path, "10.3.0")
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 4 and all("polygraphy convert" in c for c in calls)  # refit reaches b1
    assert not any("unet.b1.onnx" in c for c in calls)
    for call in calls:  # the Jetson cap survives (defect 3), the timing cache is shared
        assert "--pool-limit workspace:4096M tactic_dram:1024M" in call
        assert "--load-timing-cache engines/timing.sm87.trt10.3.0.cache" in call
        assert "--save-timing-cache engines/timing.sm87.trt10.3.0.cache" in call
        # only the graphs whose weights differ between buckets are refittable
        assert ("--refittable" in call) == any(f"{g}.onnx" in call for g in ("encoder.b0", "unet.b0")), call
    unet = next(c for c in calls if "unet.b0.onnx" in c)
    assert f"--trt-max-shapes {latent.name}:[1," in unet  # a word of its own: not quoted, not globbed
    router = next(c for c in calls if "router.onnx" in c)
    assert "--trt-max-shapes image:[4,3,64,64]" in router  # the 4 windows of a photograph
    for g in engine_graphs(manifest, refittable=True):  # the runtime finds what the script wrote
        assert (bundle / engine_file_name(g, "8.7", "10.3.0")).read_text() == "plan\n"
    assert not list(bundle.glob("engines/*.partial"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_refit_on_tensorrt_11_3_marks_the_pack_weights_and_trtexec_refuses(refit_bundle, tmp_path):
    import json

    bundle = refit_bundle
    proc, calls = _run_script(bundle, tmp_path, "11.4.0")
    assert proc.returncode == 0, proc.stderr
    unet = next(c for c in calls if "unet.b0.onnx" in c)
    assert unet.startswith("MORDASR_REFIT_GRAPH=unet.b0 polygraphy convert")
    assert "--trt-npps engines/trt_postprocess.py:mark_pack_weights" in unet
    assert "--trt-cpps engines/trt_postprocess.py:refit_individual" in unet and "--refittable" not in unet
    router = next(c for c in calls if "router.onnx" in c)
    assert "--trt-npps" not in router and "--trt-cpps" not in router  # no pack: built as usual
    marks = json.loads((bundle / "engines" / "refit_marks.json").read_text())
    from mordasr.runtime.weight_packs import load_weight_pack

    manifest = load_manifest(bundle)
    assert marks["unet.b0"] == list(load_weight_pack(bundle, manifest.weight_pack("unet", 0)))
    # 11.0-11.2: plain REFIT, no marks
    _, calls11 = _run_script(bundle, tmp_path, "11.1.0")
    assert all(("--refittable" in c) == (".b0.onnx" in c) and "--trt-npps" not in c for c in calls11)
    # trtexec cannot express REFIT_INDIVIDUAL: refused, not built differently (defect 2)
    for plan in bundle.glob("engines/*.plan"):
        plan.unlink()
    proc, calls = _run_script(bundle, tmp_path, "11.4.0", builder="trtexec")
    assert proc.returncode == 2 and "REFIT_INDIVIDUAL" in proc.stderr and "polygraphy" in proc.stderr
    # the router, which is not refittable, built; the refittable encoder stopped the script
    assert [p.name for p in bundle.glob("engines/*.trt11.4.0.*.plan")] == ["router.sm87.trt11.4.0.fp32.plan"]
    # ... and warns that it drops the tactic DRAM cap (defect 3)
    proc, calls = _run_script(bundle, tmp_path, "10.3.0", builder="trtexec")
    assert proc.returncode == 0 and "cannot cap tactic DRAM" in proc.stderr
    assert all(("--refit" in c) == (".b0.onnx" in c) and "--memPoolSize=workspace:4096M" in c for c in calls)


def test_the_bundle_postprocess_is_the_typed_module_and_marks_exactly_the_pack_tensors(refit_bundle, monkeypatch):
    """engines/trt_postprocess.py is runtime/trt_postprocess.py byte for byte (the module
    .ci/typecheck.sh checks against TensorRT's API), and marks the graph build_engines.sh names."""
    import importlib.util as iu
    from types import SimpleNamespace

    from mordasr.runtime import trt_postprocess

    copy = refit_bundle / "engines" / "trt_postprocess.py"
    assert copy.read_text() == open(trt_postprocess.__file__).read()
    spec = iu.spec_from_file_location("trt_postprocess", copy)
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    marked = []
    network = SimpleNamespace(mark_weights_refittable=lambda name: marked.append(name) or True)
    monkeypatch.setenv("MORDASR_REFIT_GRAPH", "unet.b0")
    module.mark_pack_weights(network)
    assert marked == module.refit_marks("unet.b0") and marked
    refusing = SimpleNamespace(mark_weights_refittable=lambda name: False)
    with pytest.raises(RuntimeError, match="would not mark"):
        module.mark_pack_weights(refusing)
    monkeypatch.setenv("MORDASR_REFIT_GRAPH", "router")
    with pytest.raises(RuntimeError, match="no refittable weights for graph 'router'"):
        module.mark_pack_weights(network)
    monkeypatch.delenv("MORDASR_REFIT_GRAPH")
    with pytest.raises(RuntimeError, match="set MORDASR_REFIT_GRAPH"):
        module.mark_pack_weights(network)


NVIDIA_SMI = """#!/usr/bin/env bash
echo "${FAKE_SMI_OUTPUT}"
exit "${FAKE_SMI_STATUS:-0}"
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("case, env, code, message", [
    ("banner missing", {"BUILDER": "trtexec", "FAKE_BANNER": "", "SM": "87"}, 2,
     "shows no [TensorRT vNNNNNN] banner; set TRT_VERSION"),
    ("nvidia-smi says N/A", {"TRT_VERSION": "10.3.0", "FAKE_SMI_OUTPUT": "[N/A]"}, 2,
     "cannot read the GPU's compute capability (got '[N/A]'); set SM"),
    ("nvidia-smi fails", {"TRT_VERSION": "10.3.0", "FAKE_SMI_OUTPUT": "NVIDIA-SMI has failed",
                          "FAKE_SMI_STATUS": "9"}, 2, "cannot read the GPU's compute capability"),
    ("bad TRT_VERSION", {"TRT_VERSION": "ten", "SM": "87"}, 2, "cannot tell the TensorRT version (got 'ten')"),
    ("success", {"TRT_VERSION": "10.3.0", "FAKE_SMI_OUTPUT": "8.7"}, 0,
     "building with polygraphy, TensorRT 10.3.0, sm87"),
])
def test_build_script_probes_fail_loudly(refit_bundle, tmp_path, case, env, code, message):
    """Stand-in trtexec / nvidia-smi / polygraphy on the PATH: every probe failure is one line
    naming what to set (under set -euo pipefail a silent exit was possible), and on success the
    command lines are the ones the profiles say."""
    bin_dir = _fake_tools(tmp_path)
    (bin_dir / "nvidia-smi").write_text(NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    if "FAKE_BANNER" in env:
        (bin_dir / "trtexec").write_text(FAKE_BUILDER.replace("[TensorRT v100300] ", env.pop("FAKE_BANNER")))
    log = tmp_path / "log"
    full_env = {k: v for k, v in os.environ.items() if k not in ("SM", "TRT_VERSION")}
    full_env.update({"PATH": f"{bin_dir}:/usr/bin:/bin", "BUILDER": "polygraphy", "BUILD_LOG": str(log),
                     "TRTEXEC": str(bin_dir / "trtexec"), **env})
    proc = subprocess.run(["bash", str(refit_bundle / "build_engines.sh")], env=full_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, (case, proc.stdout, proc.stderr)
    assert message in (proc.stderr if code else proc.stdout), (case, proc.stderr)
    calls = [c for c in log.read_text().splitlines() if " --help" not in c] if log.exists() else []
    if code:
        assert not calls and len(proc.stderr.strip().splitlines()) == 1  # one line, nothing built
        return
    assert [c.split()[3] if c.startswith("MORDASR") else c.split()[2] for c in calls] == [
        "router.onnx", "encoder.b0.onnx", "unet.b0.onnx", "decoder.onnx"]
    router = next(c for c in calls if "router.onnx" in c)
    assert "-o engines/router.sm87.trt10.3.0.fp32.plan.partial" in router
    assert ("--trt-min-shapes image:[1,3,64,64] --trt-opt-shapes image:[4,3,64,64] "
            "--trt-max-shapes image:[4,3,64,64]") in router
    unet = next(c for c in calls if "unet.b0.onnx" in c)
    assert unet.startswith("MORDASR_REFIT_GRAPH=unet.b0 polygraphy convert unet.b0.onnx --convert-to trt")
    assert "--refittable --trt-min-shapes latent:[1,8,32,32] --trt-opt-shapes latent:[1,8,64,64] " \
           "--trt-max-shapes latent:[1,8,128,128]" in unet


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_trtexec_version_comes_from_the_trtexec_that_builds(refit_bundle, tmp_path):
    """Defect 7: with no TRT_VERSION set, the trtexec path reads trtexec's own banner
    (v100300 -> 10.3.0), whatever Python's tensorrt says."""
    proc, calls = _run_script(refit_bundle, tmp_path, None, builder="trtexec")
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(refit_bundle)
    assert (refit_bundle / engine_file_name(manifest.graph("router"), "8.7", "10.3.0")).is_file()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_precision_flags_follow_the_tensorrt_major(folded_bundle, tmp_path):
    from mordasr.calib.precision_bundle import build_precision_bundle

    bundle = tmp_path / "fp16"
    bundle.mkdir()
    manifest = build_precision_bundle(folded_bundle, bundle, "fp16")
    write_engine_scripts(bundle, manifest, EngineOptions())
    for builder, flag in (("polygraphy", "--fp16"), ("trtexec", "--fp16")):
        _, calls10 = _run_script(bundle, tmp_path, "10.3.0", builder=builder)
        _, calls11 = _run_script(bundle, tmp_path, "11.4.0", builder=builder)
        router10 = next(c for c in calls10 if "router.onnx" in c)
        unet10 = next(c for c in calls10 if "unet.b0.onnx" in c)
        assert flag in unet10.split() and flag not in router10.split()  # the router stays FP32
        assert not any(flag in c.split() for c in calls11)  # TensorRT 11 removed the flag
    proc, _ = _run_script(bundle, tmp_path, "8.6.1")
    assert proc.returncode == 2 and "too old" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None or any(
    shutil.which(tool, path="/usr/bin:/bin") for tool in ("trtexec", "polygraphy"))
    or os.path.exists("/usr/src/tensorrt/bin/trtexec"), reason="a real builder is installed system-wide here")
def test_build_script_without_a_builder_says_what_to_install(gated_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(gated_bundle, bundle)
    write_engine_scripts(bundle, load_manifest(bundle), EngineOptions())
    env = dict(os.environ, PATH="/usr/bin:/bin", TRTEXEC="")
    proc = subprocess.run(["bash", str(bundle / "build_engines.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install polygraphy" in proc.stderr


@pytest.mark.skipif(shutil.which("polygraphy") is None and not os.path.exists(
    os.path.join(os.path.dirname(os.sys.executable), "polygraphy")), reason="needs Polygraphy")
def test_verify_script_runs_its_onnxruntime_half_with_polygraphy(refit_bundle, tmp_path):
    """The reference half of verify_engines.sh (ONNX Runtime on seeded inputs through
    `polygraphy run`) runs here; the engine half needs TensorRT."""
    import json
    import shlex

    text = (refit_bundle / "verify_engines.sh").read_text()
    lines = [line for line in text.splitlines() if line.startswith("polygraphy run ") and "--onnxrt" in line]
    assert len(lines) == 4
    assert "atol 0.001" in text  # fp32 bundle: the fp32 tolerance
    env = dict(os.environ, PATH=os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"])
    (refit_bundle / "engines" / "verify").mkdir(parents=True, exist_ok=True)
    line = next(line for line in lines if "unet.b0.onnx" in line)
    proc = subprocess.run(shlex.split(line), cwd=refit_bundle, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    saved = json.loads((refit_bundle / "engines" / "verify" / "unet.b0.onnxrt.json").read_text())
    assert saved  # ONNX Runtime's outputs, to be compared with the engine on the device


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where tensorrt is missing")
def test_export_cli_writes_the_scripts_and_reports_missing_tensorrt(tiny_model, tmp_path):
    from mordasr.export.cli import main as export_main
    from mordasr.model.io import save_checkpoint

    checkpoint = save_checkpoint(tiny_model, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    args = [str(checkpoint), "-o", str(out), "--mode", "gated", "--bucket-placement", "grid",
            "--max-size", "512", "-q", "--engines"]
    result = CliRunner().invoke(export_main, args)
    script = (out / "build_engines.sh").read_text()
    assert "--trt-max-shapes image:[1,3,128,128]" in script and "--maxShapes=image:1x3x128x128" in script
    assert (out / "verify_engines.sh").is_file()
    assert result.exit_code == 2 and "needs tensorrt, which is not installed" in result.output
    assert "build_engines.sh on the device" in result.output
    bad = CliRunner().invoke(export_main, [str(checkpoint), "-o", str(tmp_path / "x"), "--max-size", "big"])
    assert bad.exit_code == 2 and "bad size 'big'" in bad.output


# -- bucket switching, refit failures, CUDA graphs (pure logic; no TensorRT) --------------------------

class _Weights:
    """Holds weights the way a TensorRT engine does: a write replaces only the named tensors."""

    def __init__(self, initial, fail_after=None):
        self.values = {k: v.copy() for k, v in initial.items()}
        self.fail_after = fail_after

    def write(self, tensors):
        for i, (name, value) in enumerate(tensors.items()):
            if self.fail_after is not None and i == self.fail_after:
                raise BundleError("TensorRT refused the refit")
            self.values[name] = value.copy()


def _bucket_initializers(bundle, manifest, component, bucket):
    from onnx import numpy_helper as nh

    model = onnx.load(str(bundle / manifest.graph(component, bucket).file))
    return {i.name: nh.to_array(i) for i in model.graph.initializer}


def test_switching_buckets_writes_full_tensors_and_nothing_of_the_last_bucket_survives(folded_bundle):
    """Defect 8: one function switches buckets for every backend. Starting from bucket 0's graph
    and switching 0 -> 2 -> 1 -> 0 -> 3 -> 1, the weights must equal each bucket's own graph
    exactly: deltas written on top of the loaded bucket, or a tensor left over from the previous
    bucket, would both break the equality."""
    from mordasr.runtime.weight_packs import BucketSlot, pack_loader, switch_bucket

    manifest = load_manifest(folded_bundle)
    buckets = len(manifest.buckets)
    assert buckets >= 2
    for component in ("encoder", "unet"):
        weights = _Weights(_bucket_initializers(folded_bundle, manifest, component, 0))
        slot = BucketSlot(weights, bucket=0)
        for bucket in [2 % buckets, 1, 0, (buckets - 1), 1]:
            switch_bucket(slot, bucket, pack_loader(folded_bundle, manifest, component))
            expected = _bucket_initializers(folded_bundle, manifest, component, bucket)
            assert slot.bucket == bucket
            assert weights.values.keys() == expected.keys()
            assert all(np.array_equal(weights.values[k], expected[k]) for k in expected), (component, bucket)


def test_a_failed_refit_leaves_the_bucket_unknown(folded_bundle):
    """Defect 4: TensorRT may have refitted a subset when refit_cuda_engine fails; the engine must
    not stay labelled with its old bucket, so the next request for it refits again."""
    from mordasr.runtime.weight_packs import BucketSlot, pack_loader, switch_bucket

    manifest = load_manifest(folded_bundle)
    weights = _Weights(_bucket_initializers(folded_bundle, manifest, "unet", 0), fail_after=3)
    slot = BucketSlot(weights, bucket=0)
    with pytest.raises(BundleError):
        switch_bucket(slot, 1, pack_loader(folded_bundle, manifest, "unet"))
    assert slot.bucket is None  # mixed weights are not called bucket 0 (or 1)
    weights.fail_after = None
    assert switch_bucket(slot, 0, pack_loader(folded_bundle, manifest, "unet"))  # rewritten, not skipped
    expected = _bucket_initializers(folded_bundle, manifest, "unet", 0)
    assert all(np.array_equal(weights.values[k], expected[k]) for k in expected)


def test_captured_cuda_graphs_are_destroyed_when_replaced_and_closed(monkeypatch):
    """Defect 5: each new input shape recaptures; the old graph and its executable are destroyed."""
    from types import SimpleNamespace

    import mordasr.runtime.backends.tensorrt as backend
    from mordasr.runtime import cuda_runtime

    destroyed = []
    fake = SimpleNamespace(cudaGraphExecDestroy=lambda e: destroyed.append(("exec", e)) or 0,
                           cudaGraphDestroy=lambda g: destroyed.append(("graph", g)) or 0)
    monkeypatch.setattr(cuda_runtime, "cudart", fake)
    captured = backend.CapturedGraph()
    captured.set("g1", "e1", (("x", (1, 3, 8, 8)),))
    assert captured.matches((("x", (1, 3, 8, 8)),)) and not captured.matches((("x", (1, 3, 16, 16)),))
    captured.set("g2", "e2", (("x", (1, 3, 16, 16)),))
    assert destroyed == [("exec", "e1"), ("graph", "g1")]
    captured.destroy()
    assert destroyed[2:] == [("exec", "e2"), ("graph", "g2")] and captured.exec is None
    captured.destroy()  # idempotent
    assert len(destroyed) == 4


def test_cuda_python_names_the_wrapper_uses_exist():
    """cuda-python imports without a GPU here (its calls return cudaErrorInsufficientDriver) but
    ships no type stubs for cuda.bindings.runtime: runtime/cuda_runtime.py types the calls the
    backend makes (mypy checks the callers), and this checks every cudart function and enum the
    wrapper names against the real module. The backend calls cudart only through the wrapper."""
    import ast
    import inspect

    cudart = pytest.importorskip("cuda.bindings.runtime")
    import mordasr.runtime.backends.tensorrt as backend
    from mordasr.runtime import cuda_runtime

    tree = ast.parse(inspect.getsource(cuda_runtime))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cudart"}
    assert {"cudaMalloc", "cudaGraphLaunch", "cudaGraphExecDestroy", "cudaStreamDestroy", "cudaMemcpyKind"} <= used
    missing = sorted(name for name in used if not hasattr(cudart, name))
    assert not missing, f"cuda.bindings.runtime has no {missing}"
    assert "cudart" not in inspect.getsource(backend)


@pytest.mark.skipif(HAS_TENSORRT, reason="the real tensorrt imports here, before the stand-in")
def test_tensorrt_stubs_alone_do_not_pass_for_tensorrt(tmp_path, monkeypatch):
    """tensorrt-stubs installs an empty `tensorrt` namespace package; that must not count as TensorRT."""
    from mordasr.lazy import MissingDependency, has_module, import_optional

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert importlib.import_module("tensorrt")  # the namespace package imports ...
    assert not has_module("tensorrt")  # ... but is not TensorRT
    with pytest.raises(MissingDependency, match="pip install tensorrt"):
        import_optional("tensorrt", "the tensorrt backend")
    monkeypatch.delitem(sys.modules, "tensorrt")  # leave no stand-in for later tests


# -- engines (only where TensorRT imports) ------------------------------------------------------------

@needs_tensorrt
def test_engines_build_and_match_onnxruntime(folded_bundle, tmp_path):
    """Real engines with a photograph's shapes (four router windows, tiles), within the FP32
    tolerance the product itself uses for engines against ONNX Runtime."""
    from mordasr.export.engines import build_engines
    from mordasr.runtime import Restorer
    from mordasr.runtime.tolerances import DEFAULT_TOLERANCES

    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    options = EngineOptions(min_size="64", opt_size="128", max_size="256", refittable=True)
    replace(load_manifest(bundle), engine_options=options.to_dict()).write(bundle)
    built = build_engines(bundle, options)
    assert {e.graph for e in built} == {"router", "encoder.b0", "unet.b0", "decoder"}
    image = np.random.default_rng(0).uniform(0, 1, (150, 200, 3)).astype(np.float32)
    atol, _ = DEFAULT_TOLERANCES["fp32"]
    with Restorer(bundle) as reference, Restorer(bundle, backend="tensorrt", bucket_switch="refit") as engines:
        for bucket in (1, 0, 1):
            diff = np.abs(engines.restore(image, bucket=bucket).image - reference.restore(image, bucket=bucket).image)
            assert diff.max() < atol


@needs_tensorrt
def test_engine_for_another_device_is_built_into_the_cache_or_refused(folded_bundle, tmp_path):
    from mordasr.runtime import Restorer
    from mordasr.runtime.manifest import EngineSpec

    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    manifest = load_manifest(bundle)
    fake = EngineSpec("router", "engines/router.sm10.trt10.0.0.fp32.plan", "0" * 64, "1.0", "10.0.0", "fp32", {})
    replace(manifest, engines=[fake]).write(bundle)
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(BundleError, match="compute capability 1.0.*rebuild"):
        Restorer(bundle, backend="tensorrt", build_missing=False).restore(image)
    with Restorer(bundle, backend="tensorrt", cache_dir=tmp_path / "cache") as engines:
        engines.restore(image)
    assert list((tmp_path / "cache").glob("router.*.plan"))
