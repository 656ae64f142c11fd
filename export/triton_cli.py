"""``mordasr-triton``: a Triton Inference Server model repository from an exported bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mordasr.cli_errors import failer
from mordasr.errors import MordasrError
from mordasr.runtime.cli_options import tile_option, verbosity

_fail = failer("mordasr-triton")


@click.command("mordasr-triton", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Repository folder to write (or, with --check, to check).")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Instance kind of the component models: auto is GPU for engines, CPU for ONNX "
                   "graphs (Triton's onnxruntime backend uses CUDA when given gpu).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each component model.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Dynamic batching limit of each component model (engines: at most their profile's).")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Dynamic batching: microseconds a request may wait for others.")
@click.option("--engines", is_flag=True,
              help="Serve the bundle's TensorRT engines (tensorrt_plan) instead of its ONNX graphs.")
@tile_option
@click.option("--check", is_flag=True, help="Only validate the repository at --out and report problems.")
@click.option("--force", is_flag=True, help="Replace an existing repository folder.")
@verbosity
def main(bundle: Path, out: Path, kind: str, instances: int, max_batch_size: int, queue_delay_us: int,
         engines: bool, tile: int | None, check: bool, force: bool) -> None:
    """Write a Triton model repository for BUNDLE: one model per graph and the 'mordasr' model.

    Component models use Triton's onnxruntime backend (or tensorrt_plan with --engines) with
    dynamic batching; 'mordasr' is a Python-backend model that runs router -> bucket -> encoder ->
    UNet -> x0 step -> decoder over them by BLS, with mordasr's own runtime. Every config.pbtxt is
    validated against Triton's ModelConfig schema and the graphs it serves. README.md in the
    repository says how to start tritonserver on it.
    """
    from mordasr.export.triton import TritonOptions, validate_repository, write_triton_repository

    try:
        if not check:
            options = TritonOptions(kind, instances, max_batch_size, queue_delay_us, engines)
            models = write_triton_repository(bundle, out, options, tiling={"tile": tile} if tile is not None else None,
                                             force=force)
            click.echo(f"wrote {out}: {len(models)} models ({', '.join(models)})")
        problems = validate_repository(out)
    except MordasrError as err:
        _fail(str(err))
    for problem in problems:
        click.echo(f"mordasr-triton: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{out}: every config.pbtxt is a valid Triton ModelConfig matching its model")


if __name__ == "__main__":
    main()
