"""mordasr-bench on the tiny preset with few iterations: the report has its structure and every
figure in it is a measurement (finite numbers, no placeholders)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from mordasr.benchmarks.cli import main as bench_main
from mordasr.benchmarks.measure import graph_flops, time_call
from mordasr.benchmarks.runner import BenchConfig, interleaved_ratios, precision_ratios, targets
from mordasr.errors import MordasrError

FAST = ["--train-steps", "2", "--iterations", "2", "--warmup", "1", "--rounds", "2", "--lr-size", "16",
        "--resolutions", "16,24",
        "--eval-images", "2", "--bucket-sweep", "1,2", "--buckets", "2", "-q"]


def _numbers(value, path=""):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report"
    result = CliRunner().invoke(bench_main, ["--out", str(out)] + FAST)
    assert result.exit_code == 0, result.output
    return out


def test_bench_smoke(tmp_path):
    """The benchmark's path, fast: folded MoR against merged dense LoRA, one precision."""
    out = tmp_path / "report"
    result = CliRunner().invoke(bench_main, ["--out", str(out), *FAST, "--variants", "mor-folded,dense-lora",
                                             "--bucket-sweep", "1", "--buckets", "1"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in results["variants"]] == ["mor-folded", "dense-lora"]
    assert all(math.isfinite(r["latency"]["p50_ms"]) and r["latency"]["p50_ms"] > 0 for r in results["variants"])
    assert any(t["target"].startswith("folded UNet latency / merged dense-LoRA UNet latency")
               for t in results["targets"])


@pytest.mark.slow
def test_report_files_and_structure(report):
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "report.html", "results.json", "latency.png", "resolution.png", "buckets.png",
            "memory.png"} <= names
    assert not [n for n in names if n.startswith(".")]  # the work folder is gone
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    results = json.loads((report / "results.json").read_text())
    assert [r["variant"] for r in results["variants"]] == ["mor-folded", "mor-gated", "mor-hybrid",
                                                          "dense-lora", "adaptir", "torch-eager"]
    params = {r["variant"]: r["adapter_params"] for r in results["variants"] if "adapter_params" in r}
    assert params["adaptir"] > 0 and params["mor-folded"] > params["dense-lora"] > 0  # MoR adds routers
    assert "## Adapters compared" in (report / "report.md").read_text()
    folded = results["variants"][0]
    assert set(folded["components"]) == {"router", "encoder", "unet", "decoder"}
    assert folded["memory"]["peak_rss_mib"] > folded["memory"]["import_rss_mib"] > 10
    assert folded["size"]["weight_packs_mib"] > 0
    assert [r["buckets"] for r in results["bucket_sweep"]] == [1, 2]
    switch = results["bucket_switch"]
    assert switch["refit_fixed_p50_ms"] > 0 and switch["graphs_fixed_p50_ms"] > 0
    assert switch["refittable_vs_fixed_latency"] > 0 and "## Bucket switch" in (report / "report.md").read_text()
    assert {t["target"].split(" (")[0] for t in results["targets"]} >= {
        "folded UNet latency / merged dense-LoRA UNet latency", "gated UNet latency / folded UNet latency"}
    assert results["machine"]["cores"] >= 1 and results["machine"]["onnxruntime"]
    assert results["config"]["adapters"]["mor"] == {"checkpoint": None, "base": "tiny", "steps": 2,
                                                    "random_weights": False}
    assert "mor 2 steps, trained by this run" in (report / "report.md").read_text()


def test_given_checkpoints_are_reported_with_their_own_steps(tmp_path, tiny_model):
    """A run on given checkpoints reports their origin and training steps, not --train-steps."""
    from mordasr.benchmarks.runner import _models
    from mordasr.model.io import save_checkpoint

    path = save_checkpoint(tiny_model, tmp_path / "mor", {"training": {"steps": 7}, "random_weights": False})
    cfg = BenchConfig(variants=("mor-folded",), mor_checkpoint=path, train_steps=150)
    models, provenance = _models(cfg, lambda _: None)
    assert set(models) == {"mor"}
    assert provenance == {"mor": {"checkpoint": str(path), "steps": 7, "random_weights": False}}


def test_bundles_are_labelled_random_only_when_their_weights_are(tmp_path, tiny_model, monkeypatch):
    """The sd21 preset with real weights given: its bundles are not labelled random (every sd21
    bundle was, whatever its weights)."""
    from mordasr.benchmarks import runner
    from mordasr.model.io import save_checkpoint

    path = save_checkpoint(tiny_model, tmp_path / "mor", {"training": {"steps": 7}, "random_weights": False})
    labels = []
    monkeypatch.setattr(runner, "export_bundle", lambda *a, random_weights, **k: labels.append(random_weights)
                        or (_ for _ in ()).throw(MordasrError("stop after the export call")))
    cfg = BenchConfig(preset="sd21", variants=("mor-folded",), mor_checkpoint=path)
    with pytest.raises(MordasrError, match="stop after the export call"):
        runner.run_benchmark(cfg, tmp_path / "work")
    assert labels == [False]


@pytest.mark.slow
def test_every_number_is_measured(report):
    results = json.loads((report / "results.json").read_text())
    numbers = list(_numbers(results))
    assert len(numbers) > 150
    assert all(math.isfinite(v) for _, v in numbers), [p for p, v in numbers if not math.isfinite(v)]
    for row in results["variants"]:
        lat = row["latency"]
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] and lat["runs"] == 2
        for c in (row["components"] or {}).values():
            assert c["p50_ms"] > 0 and c["gflops"] > 0
    # the same graph run twice is not timed identically: these are clocks, not constants
    assert len({r["latency"]["p50_ms"] for r in results["variants"]}) == len(results["variants"])
    md = (report / "report.md").read_text()
    assert "| mor-folded | fp32 |" in md and "TODO" not in md and "nan" not in md.lower()
    # n/a only where a figure does not apply: the eager reference has no bundle, graphs or peak
    for line in md.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 16 and (cells[1].startswith("mor-") or cells[1] == "dense-lora"):  # variants table
            assert "n/a" not in cells[3:15], line


def test_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(bench_main, ["--out", str(tmp_path / "r"), "--variants", "mor-folded,sparse"])
    assert result.exit_code == 2 and "--variants: unknown value 'sparse'" in result.output
    result = runner.invoke(bench_main, ["--out", str(tmp_path / "r"), "--backend", "openvino"])
    assert result.exit_code == 2 and "'openvino' is not one of" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(bench_main, ["--out", str(blocker / "sub")])
    assert result.exit_code == 2 and "cannot write" in result.output
    with pytest.raises(MordasrError, match="unknown precision"):
        BenchConfig(precisions=("fp8",)).validate()


def test_time_call_and_targets():
    calls = []
    stats = time_call(lambda: calls.append(1), iterations=5, warmup=0)
    assert len(calls) == 6 and stats["runs"] == 5  # one untimed warm-up is always made
    rows = [{"variant": "mor-folded", "precision": "fp32", "runtime_overhead": 0.01,
             "components": {"unet": {"p50_ms": 9.0}}},
            {"variant": "dense-lora", "precision": "fp32", "runtime_overhead": 0.05,
             "components": {"unet": {"p50_ms": 10.0}}}]
    # a clock that the calls advance (2 ms or 4 ms, with a little seeded jitter): the ratio logic
    # is tested, not this machine's scheduler
    now, jitter = [0.0], np.random.default_rng(0)

    def taking(ms: float):
        def call() -> None:
            now[0] += ms * 1e-3 * (1 + 0.05 * jitter.standard_normal())
        return call

    ratios = interleaved_ratios({("mor-folded", "fp32"): taking(2), ("dense-lora", "fp32"): taking(4),
                                 ("mor-gated", "fp32"): taking(4)}, rounds=4, per_round=2, clock=lambda: now[0])
    found = {t["target"]: t for t in targets(rows, ratios)}
    folded = found["folded UNet latency / merged dense-LoRA UNet latency (fp32)"]
    assert folded["rounds"] == 4 and folded["ci95"][0] <= folded["ratio"] <= folded["ci95"][1]
    assert 0.3 < folded["ratio"] < 0.8 and folded["met"]  # ~0.5, its whole interval under 1.00
    gated = found["gated UNet latency / folded UNet latency (fp32)"]
    assert gated["ratio"] > 1.3 and not gated["met"]
    # a ratio under the limit whose interval reaches past it does not count as met
    wide = targets([], [{"target": "t", "ratio": 0.98, "ci95": [0.90, 1.06], "rounds": 3, "limit": 1.0}])
    assert not wide[0]["met"]
    assert not found["runtime overhead over raw session time, dense-lora (fp32)"]["met"]
    # INT8 against FP32 end to end, per variant: met at 1/1.5 of FP32's time, not at 1/1.2
    speeds = precision_ratios({("mor-folded", "fp32"): taking(3), ("mor-folded", "int8"): taking(1.5),
                               ("dense-lora", "fp32"): taking(3), ("dense-lora", "int8"): taking(2.5),
                               ("mor-gated", "int8"): taking(1)}, rounds=5, clock=lambda: now[0])
    found = {t["target"]: t for t in targets([], speeds)}
    assert set(found) == {"end-to-end latency, int8 / fp32, mor-folded", "end-to-end latency, int8 / fp32, dense-lora"}
    assert found["end-to-end latency, int8 / fp32, mor-folded"]["met"]
    assert not found["end-to-end latency, int8 / fp32, dense-lora"]["met"]


def test_graph_flops_counts_conv_and_matmul(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    m = numpy_helper.from_array(np.zeros((8, 5), np.float32), "m")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("MatMul", ["c", "m"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, m])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    flops = graph_flops(tmp_path / "g.onnx", {"x": np.zeros((2, 3, 8, 8), np.float32)})
    conv = 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
    matmul = 2 * (2 * 8 * 8 * 5) * 8
    assert flops == conv + matmul


def test_eval_pairs_fit_photographs_smaller_than_the_asked_size():
    """--lr-size 128 asks for 512 px crops of sample photographs that are 300 px high: the crop
    shrinks to the photograph, square and a multiple of the scale, so HR is exactly 4x LR."""
    from mordasr.benchmarks.runner import BenchConfig, _eval_set

    for lr_size in (16, 128):
        for lr, hr in _eval_set(BenchConfig(preset="tiny", lr_size=lr_size, eval_images=3), 4):
            assert hr.shape[:2] == (lr.shape[0] * 4, lr.shape[1] * 4), (lr.shape, hr.shape)
            assert hr.shape[0] == hr.shape[1]


def test_teacher_speed_lines_name_the_teacher():
    from mordasr.benchmarks.report import teacher_speed_lines

    side = {"seconds_per_megapixel": 2.0, "seconds_per_megapixel_range": [1.9, 2.1], "peak_rss_mib": 300.0}
    measured = {"photo": "p.png", "input": [8, 8], "output": [32, 32], "rounds": 2, "backend": "onnxruntime",
                "teacher_name": "realesrgan-x4plus", "bundle": "mor-folded", "base": "esrgan-student",
                "student": side, "teacher": {**side, "seconds_per_megapixel": 12.0},
                "teacher_over_student": {"ratio": 6.0, "ci95": [5.5, 6.5], "per_round": [6.0, 6.0]}}
    lines = teacher_speed_lines(measured)
    teacher_row = next(line for line in lines if line.startswith("| teacher"))
    assert teacher_row.startswith("| teacher realesrgan-x4plus (") and "| 12.00 (1.90-2.10) | 300 |" in teacher_row
