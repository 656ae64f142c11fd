"""Click options every command that runs bundles shares (mordasr-run, mordasr-serve, mordasr-eval),
defined once so their names, choices and defaults cannot drift apart."""

from __future__ import annotations

import click

from mordasr.runtime.backends import BACKENDS

BACKEND_HELP = ("onnxruntime: ONNX Runtime on the CPU; ort-cuda / ort-trt: ONNX Runtime's CUDA or TensorRT "
                "execution provider (onnxruntime-gpu; ort-trt caches engines in the bundle's ort-trt-cache/); "
                "tensorrt: the bundle's TensorRT engines (build them with build_engines.sh).")


def backend_option(command):
    return click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True,
                        help=BACKEND_HELP)(command)


def threads_option(help: str = "CPU threads per graph for ONNX Runtime [default: all cores]."):
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


def bucket_switch_option(command):
    return click.option(
        "--bucket-switch", type=click.Choice(["graphs", "refit"]), default=None,
        help="Folded bundles: graphs keeps one graph/engine per bucket; refit keeps bucket 0's and writes the "
             "chosen bucket's weight pack into it (less memory, slower switch) [default: what the bundle's "
             "device profile chose, else graphs].")(command)


def max_engines_option(command):
    return click.option("--max-engines", type=click.IntRange(min=1), default=None,
                        help="tensorrt: engines held loaded at once (least recently used ones are freed) "
                             "[default: the bundle's device profile, else 8].")(command)
