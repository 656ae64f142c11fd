"""Measurement primitives: timing statistics, FLOPs counted from an ONNX graph, peak RSS of a
restore in a fresh process, and a description of the machine the numbers came from."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def time_call(fn: Callable[[], object], iterations: int, warmup: int = 1) -> dict[str, float]:
    """Latency statistics in milliseconds over ``iterations`` warm calls."""
    for _ in range(max(warmup, 1)):  # the first call creates sessions: never time it
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    ms = np.array(samples)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "runs": iterations}


COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _runtime_shapes(model, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Actual shapes of the counted nodes' tensors, from one ONNX Runtime run with them exposed as
    outputs (static shape inference loses track through the attention reshapes)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    constants = {i.name: tuple(i.dims) for i in probe.graph.initializer}
    wanted = []
    for node in probe.graph.node:
        if node.op_type in COUNTED_OPS:
            wanted += [t for t in list(node.input[:2]) + [node.output[0]] if t and t not in constants]
    existing = {o.name for o in probe.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in existing and name not in feeds:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, feeds)
    shapes = dict(constants)
    shapes.update({n: tuple(v.shape) for n, v in zip(names, values)})
    shapes.update({n: tuple(v.shape) for n, v in feeds.items()})
    return shapes


def graph_flops(path: str | Path, feeds: dict[str, np.ndarray]) -> float:
    """Multiply-add FLOPs (2 per MAC) of the Conv, ConvTranspose, MatMul and Gemm nodes for these
    inputs; other ops are memory-bound and left out."""
    import onnx

    model = onnx.load(str(path))
    shapes = _runtime_shapes(model, feeds)
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        a, b, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if a is None or b is None or out is None:
            raise ValueError(f"no shape for node {node.name} ({node.op_type})")
        if node.op_type == "Conv":  # weight (Cout, Cin/groups, kh, kw) per output element
            macs = np.prod(out) * np.prod(b[1:])
        elif node.op_type == "ConvTranspose":  # every input element meets (Cout/groups, kh, kw)
            macs = np.prod(a) * np.prod(b[1:])
        else:
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k = a[-2] if trans_a else a[-1]
            macs = np.prod(out) * k
        total += 2 * float(macs)
    return total


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started from a big
# parent would report the parent's peak.
_RSS_SCRIPT = """
import json, sys
import numpy as np
from mordasr.runtime import Restorer
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
bundle, side, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
before = hwm()
r = Restorer(bundle, backend=backend)
image = np.random.default_rng(0).uniform(0, 1, (side, side, 3)).astype(np.float32)
for b in range(len(r.manifest.buckets) if r.manifest.mode == "folded" else 1):
    r.restore(image, bucket=b if r.manifest.mode == "folded" else None)
print(json.dumps({"baseline_kib": before, "peak_kib": hwm()}))
"""


def peak_rss_mib(bundle: str | Path, lr_side: int, backend: str = "onnxruntime") -> dict[str, float]:
    """Peak resident memory (VmHWM, Linux) of a fresh process that loads the bundle and restores
    one image through every bucket (folded bundles hold every bucket's graphs), in MiB."""
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(bundle), str(lr_side), backend],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_mib": data["peak_kib"] / 1024, "import_rss_mib": data["baseline_kib"] / 1024}


_RUN_SCRIPT = """
import resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
if proc.returncode != 0:
    sys.exit(proc.stderr[-2000:])
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def photo_speed(bundle: str | Path, photo: str | Path, runs: int = 2, backend: str = "onnxruntime") -> dict:
    """``mordasr-run PHOTO -o OUT --bundle B`` with its defaults (tiling included), end to end in a
    fresh process each run: wall seconds per output megapixel and the command's peak RSS (max over
    runs; Linux ru_maxrss of the child)."""
    import tempfile

    from PIL import Image

    width, height = Image.open(photo).size
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.png"
        command = [sys.executable, "-m", "mordasr.runtime.cli", str(photo), "-o", str(out), "--bundle", str(bundle),
                   "--backend", backend]
        seconds, peaks = [], []
        for _ in range(runs):
            proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, *command], capture_output=True, text=True,
                                  timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"mordasr-run failed: {proc.stderr.strip()[-500:]}")
            wall, peak_kib = proc.stdout.split()
            seconds.append(float(wall))
            peaks.append(int(peak_kib) / 1024)
            out_w, out_h = Image.open(out).size
    megapixels = out_w * out_h / 1e6
    per_mp = [s / megapixels for s in seconds]
    return {"photo": Path(photo).name, "input": [width, height], "output": [out_w, out_h],
            "output_megapixels": megapixels, "runs": runs, "seconds": seconds,
            "seconds_per_megapixel": float(np.mean(per_mp)),
            "seconds_per_megapixel_range": [float(min(per_mp)), float(max(per_mp))],
            "peak_rss_mib": float(max(peaks)), "backend": backend}


def _timed_run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, *command], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: {proc.stderr.strip()[-500:]}")
    wall, peak_kib = proc.stdout.split()
    return float(wall), int(peak_kib) / 1024


def student_and_teacher_speed(bundle: str | Path, teacher: str, photo: str | Path, rounds: int = 3,
                              backend: str = "onnxruntime") -> dict:
    """The bundle (``mordasr-run``'s defaults) and a distillation teacher restoring the same
    photograph end to end, each in a fresh process, alternately for ``rounds`` rounds: seconds per
    output megapixel of each, peak RSS, and the teacher/student time ratio per round, reported as
    its mean with a 95 % interval (Student's t) -- both sides measured in one run, on the same cores."""
    import tempfile

    from PIL import Image
    from scipy import stats

    if rounds < 2:
        raise ValueError("rounds must be at least 2 to give a confidence interval")
    width, height = Image.open(photo).size
    runs: dict[str, list[tuple[float, float]]] = {"student": [], "teacher": []}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "student": [sys.executable, "-m", "mordasr.runtime.cli", str(photo), "-o", f"{tmp}/student.png",
                        "--bundle", str(bundle), "--backend", backend, "-q"],
            "teacher": [sys.executable, "-m", "mordasr.training.teachers", str(photo), f"{tmp}/teacher.png",
                        "--teacher", teacher]}
        for _ in range(rounds):
            for side, command in commands.items():
                runs[side].append(_timed_run(command))
        out_w, out_h = Image.open(f"{tmp}/student.png").size
        if Image.open(f"{tmp}/teacher.png").size != (out_w, out_h):
            raise RuntimeError("the teacher's output and the student's differ in size")
    megapixels = out_w * out_h / 1e6
    result: dict = {"photo": Path(photo).name, "input": [width, height], "output": [out_w, out_h],
                    "rounds": rounds, "backend": backend, "teacher_name": teacher}
    for side, measured in runs.items():
        per_mp = [s / megapixels for s, _ in measured]
        result[side] = {"seconds_per_megapixel": float(np.mean(per_mp)),
                        "seconds_per_megapixel_range": [float(min(per_mp)), float(max(per_mp))],
                        "peak_rss_mib": float(max(m for _, m in measured))}
    ratios = np.array([t / s for (s, _), (t, _) in zip(runs["student"], runs["teacher"])])
    half = float(stats.t.ppf(0.975, len(ratios) - 1) * ratios.std(ddof=1) / np.sqrt(len(ratios)))
    result["teacher_over_student"] = {"ratio": float(ratios.mean()),
                                      "ci95": [float(ratios.mean()) - half, float(ratios.mean()) + half],
                                      "per_round": [float(r) for r in ratios]}
    return result


def describe_machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info: dict[str, object] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory,
                               "os": platform.platform(), "python": platform.python_version()}
    from mordasr.lazy import has_module, import_optional

    for module in ("onnxruntime", "torch", "tensorrt"):
        info[module] = import_optional(module, "describe_machine").__version__ if has_module(module) else None
    info["gpu"] = None
    if has_module("torch"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
