"""``mordasr-run``: restore an image or a folder of images with an exported bundle."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from mordasr.errors import MordasrError
from mordasr.runtime.backends import BACKENDS
from mordasr.runtime.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, read_image, write_image

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


def _fail(message: str) -> None:
    click.echo(f"mordasr-run: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _jobs(input_path: Path, output: Path, fmt: str | None) -> list[tuple[Path, Path]]:
    if input_path.is_dir():
        files = sorted(p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, (output / p.relative_to(input_path)).with_suffix(fmt or p.suffix)) for p in files]
    if output.is_dir():
        output = output / (input_path.stem + (fmt or ".png"))
    elif fmt:
        output = output.with_suffix(fmt)
    return [(input_path, output)]


def _compare(input_path: Path, bundle: Path, specs: str, max_pixels: int) -> None:
    from mordasr.runtime.compare import compare_backends

    if input_path.is_dir():
        _fail("--compare-backends takes one image, not a folder")
    try:
        image = read_image(input_path, max_pixels=max_pixels)
        rows = compare_backends(bundle, image, [s for s in specs.split(",") if s.strip()])
    except MordasrError as err:
        _fail(str(err))
    a, b = specs.split(",")[:2]
    click.echo(f"{input_path}: {a.strip()} vs {b.strip()}")
    click.echo(f"  {'output':<12} {'max abs':>12} {'mean abs':>12}")
    for row in rows:
        click.echo(f"  {row['output']:<12} {row['max_abs']:>12.3g} {row['mean_abs']:>12.3g}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output image file, or folder (created) when INPUT is a folder (required unless "
                   "--compare-backends).")
@click.option("--bundle", required=True, type=click.Path(path_type=Path),
              help="Bundle folder written by mordasr-export (holds manifest.json).")
@click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", show_default=True,
              help="onnxruntime: ONNX Runtime on the CPU; ort-cuda / ort-trt: ONNX Runtime's CUDA or "
                   "TensorRT execution provider (onnxruntime-gpu; ort-trt caches engines in the "
                   "bundle's ort-trt-cache/); tensorrt: the bundle's TensorRT engines (build them "
                   "with build_engines.sh).")
@click.option("--bucket-switch", type=click.Choice(["graphs", "refit"]), default="graphs", show_default=True,
              help="Folded bundles: graphs keeps one graph/engine per bucket; refit keeps bucket 0's "
                   "and writes the chosen bucket's weight pack into it (less memory, slower switch).")
@click.option("--max-engines", type=click.IntRange(min=1), default=8, show_default=True,
              help="tensorrt: engines held loaded at once (least recently used ones are freed).")
@click.option("--compare-backends", default=None, metavar="A,B",
              help="Instead of writing outputs, run INPUT on two backends (e.g. onnxruntime,tensorrt or "
                   "onnxruntime,onnxruntime:refit) and print max/mean abs difference per graph.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads per graph for ONNX Runtime [default: all cores].")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp", "tiff", "bmp"]), default=None,
              help="Output format [default: the output name's suffix; PNG for a folder's files "
                   "keeps each input's suffix].")
@click.option("--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse inputs with more pixels than this (guards memory and decompression bombs).")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def main(input_path: Path, output: Path | None, bundle: Path, backend: str, bucket_switch: str,
         max_engines: int, compare_backends: str | None, threads: int | None, fmt: str | None,
         max_pixels: int, quiet: bool) -> None:
    """Super-resolve INPUT (an image file, or a folder searched recursively) with a bundle.

    The degradation router scores each image; a folded bundle then runs the graphs of the
    nearest bucket, a gated bundle feeds the scores to its single UNet. Outputs are written
    atomically: a failed image leaves no file behind.

    Exit codes: 0 all images restored; 1 some images of a folder failed (each is reported);
    2 bad bundle, bad arguments, or the single input image failed.
    """
    from mordasr.runtime.pipeline import Restorer  # after argument parsing, so --help is instant

    if not input_path.exists():
        _fail(f"{input_path}: no such file or folder")
    if compare_backends:
        _compare(input_path, bundle, compare_backends, max_pixels)
        return
    if output is None:
        _fail("missing option -o/--output")
    suffix = f".{'jpg' if fmt == 'jpg' else fmt}" if fmt else None
    if input_path.is_dir() and output.exists() and not output.is_dir():
        _fail(f"{output}: INPUT is a folder, so the output must be a folder")
    jobs = _jobs(input_path, output, suffix)
    if not jobs:
        _fail(f"{input_path}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    options: dict = {"bucket_switch": bucket_switch}
    if threads and backend != "tensorrt":
        options["threads"] = threads
    if backend == "tensorrt":
        options["max_engines"] = max_engines
    try:
        restorer = Restorer(bundle, backend=backend, **options)
    except MordasrError as err:
        _fail(str(err))

    failures: list[tuple[Path, str]] = []
    progress = None
    if len(jobs) > 1 and not quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(jobs), unit="img", dynamic_ncols=True, file=sys.stderr)
    for src, dst in jobs:
        start = time.perf_counter()
        try:
            image = read_image(src, max_pixels=max_pixels)
            result = restorer.restore(image)
            write_image(dst, result.image)
        except MordasrError as err:
            failures.append((src, str(err)))
            click.echo(f"mordasr-run: error: {err}", err=True)
        else:
            if not quiet:
                where = f"bucket {result.bucket}" if result.bucket is not None else restorer.manifest.mode
                msg = (f"{src} -> {dst} ({image.shape[1]}x{image.shape[0]} -> "
                       f"{result.image.shape[1]}x{result.image.shape[0]}, {where}, "
                       f"{time.perf_counter() - start:.2f} s)")
                (progress.write if progress else click.echo)(msg)
        if progress:
            progress.update(1)
    if progress:
        progress.close()
    if failures:
        if len(jobs) == 1:
            sys.exit(EXIT_ERROR)
        click.echo(f"mordasr-run: {len(failures)} of {len(jobs)} images failed:", err=True)
        for src, reason in failures:
            click.echo(f"  {src}: {reason}", err=True)
        sys.exit(EXIT_SOME_FAILED)
