"""The click options mordasr's commands share, defined once so their names, choices and defaults
cannot drift apart: backends, threads, bucket switching, tiling and colour fixes, image limits,
precision maps, comma-separated lists, and ``-v`` / ``-q`` with the one logging setup."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

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


def precision_map_options(overrides: str):
    """``--component-precision`` and ``--fp32-fallback``, shared by mordasr-calib and mordasr-export."""
    def decorate(command):
        command = click.option(
            "--fp32-fallback", multiple=True, type=click.Choice(["encoder", "unet", "decoder"]),
            help="Also ship this component's FP32 graph; mordasr-run reruns it when the reduced-precision "
                 "output is NaN/inf (repeat the option; FP16 VAE decoders need it most).")(command)
        return click.option(
            "--component-precision", default=None, metavar="C=P,...",
            help="Per-component precision, e.g. unet=int8,decoder=fp32 (encoder, unet, decoder; the "
                 f"router stays fp32); overrides {overrides}.")(command)
    return decorate


VERBOSE_HELP = "Log each step (INFO)."
QUIET_HELP = "Print errors only: no progress bars, no per-item lines, no warnings."


class _CommandLog(logging.Handler):
    """Log records as ``<command>: warning: ...`` lines on stderr (``INFO <logger>: ...`` with -v),
    written above any progress bar."""

    def __init__(self, prog: str, level: int) -> None:
        super().__init__(level)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        if record.levelno >= logging.WARNING:
            line = f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}"
        else:
            line = f"{record.levelname} {record.name}: {record.getMessage()}"
        tqdm.write(line, file=sys.stderr)


def setup_logging(verbose: bool = False, quiet: bool = False, prog: str | None = None) -> None:
    """The one logging setup of every mordasr command: INFO with -v, ERROR with -q, else WARNING."""
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    if prog is None:
        context = click.get_current_context(silent=True)
        prog = context.command_path if context else "mordasr"
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CommandLog)]:
        root.removeHandler(handler)
    root.addHandler(_CommandLog(prog, level))
    root.setLevel(level)


def verbosity(command):
    """``-v/--verbose`` and ``-q/--quiet``, the same on every command; logging is set up from them
    before the command runs, and ``quiet`` is passed on to commands that take it (progress bars)."""
    wants_quiet = "quiet" in inspect.signature(command).parameters

    @functools.wraps(command)
    def run(*args, verbose: bool, quiet: bool, **kwargs):
        setup_logging(verbose, quiet)
        if wants_quiet:
            kwargs["quiet"] = quiet
        return command(*args, **kwargs)

    run = click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)(run)
    return click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)(run)


_KIND_NAMES = {int: "a whole number", float: "a number"}


def parse_list(text: str | None, option: str, kind: Callable[[str], Any] = str,
               choices: Sequence[str] | None = None) -> tuple:
    """The items of a comma-separated value (``"a, b,c"``), each converted by ``kind`` and, with
    ``choices``, one of them: the one parser of every list-valued option and setting. A
    ``ValueError`` naming ``option`` for a bad item, or for no item at all."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: give at least one value (comma-separated)")
    values = []
    for item in items:
        if choices is not None and item not in choices:
            raise ValueError(f"{option}: unknown value {item!r}; choose from {', '.join(choices)}")
        try:
            values.append(kind(item))
        except ValueError:
            what = _KIND_NAMES.get(kind, "valid")  # type: ignore[call-overload]
            raise ValueError(f"{option}: {item!r} is not {what} (give a comma-separated list)") from None
    return tuple(values)


def parse_pairs(text: str | None, option: str, kind: Callable[[str], Any] = str,
                keys: Sequence[str] | None = None, form: str = "KEY=VALUE") -> dict[str, Any]:
    """``"unet=int8,decoder=fp32"`` as a dict (``parse_list`` for ``KEY=VALUE`` items); empty text
    gives an empty dict."""
    if not (text or "").strip():
        return {}
    pairs = {}
    for item in parse_list(text, option):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option}: {item!r} is not {form}")
        if keys is not None and key.strip() not in keys:
            raise ValueError(f"{option}: {item!r}: the key is one of {', '.join(keys)}")
        pairs[key.strip()] = parse_list(value, option, kind)[0] if value.strip() else ""
    return pairs


def max_pixels_option(help: str = "Refuse inputs with more pixels than this (guards memory and decompression bombs)."):
    from mordasr.runtime.images import DEFAULT_MAX_PIXELS

    return click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
                        help=help)


def tile_option(command):
    return click.option("--tile", type=click.IntRange(min=0), default=None,
                        help="Tile side in input (LR) pixels for images larger than it; 0 disables tiling "
                             "[default: the bundle profile's largest output / scale].")(command)


def color_fix_option(command):
    return click.option(
        "--color-fix", type=click.Choice(["none", "adain", "wavelet"]), default="none", show_default=True,
        help="Pull the output's colours toward the input (OSEDiff's AdaIN or wavelet fix), band by band; adain "
             "keeps a streamed output in a temporary file until its statistics are known.")(command)
