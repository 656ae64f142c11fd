"""``mordasr-run``: restore an image or a folder of images with an exported bundle."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from mordasr.cli_errors import failer
from mordasr.errors import MordasrError
from mordasr.runtime.backends import backend_options
from mordasr.runtime.cli_options import (
    backend_option,
    bucket_switch_option,
    color_fix_option,
    max_engines_option,
    max_pixels_option,
    parse_list,
    threads_option,
    tile_option,
    verbosity,
)
from mordasr.runtime.images import IMAGE_SUFFIXES, read_image
from mordasr.runtime.signals import DEFAULT_GRACE_S

_fail = failer("mordasr-run")
log = logging.getLogger("mordasr.runtime")

EXIT_OK, EXIT_SOME_FAILED, EXIT_ERROR = 0, 1, 2


class _Reporter:
    """Prints each file's line (or error), a tqdm bar with images/s and ETA for several files, and
    one with tiles/s and ETA while a tiled image restores (minutes for a large photograph on a
    CPU); keeps the failures for the summary."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.quiet, self.failures = quiet, []
        self.progress = self.tiles = None
        if total > 1 and not quiet:
            from tqdm import tqdm

            self.progress = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)

    def tile(self, done: int, total: int) -> None:
        if self.quiet or total < 2:
            return
        if self.tiles is None or done <= self.tiles.n:  # a new image (the last may have failed midway)
            from tqdm import tqdm

            if self.tiles is not None:
                self.tiles.close()
            self.tiles = tqdm(total=total, unit="tile", leave=False, dynamic_ncols=True, file=sys.stderr)
        self.tiles.update(done - self.tiles.n)
        if done == total:
            self.tiles.close()
            self.tiles = None

    def __call__(self, src, error: str, message: str) -> None:
        if error:
            self.failures.append((Path(src), error))
            if self.progress:
                self.progress.write(f"mordasr-run: error: {error}", file=sys.stderr)
            else:
                click.echo(f"mordasr-run: error: {error}", err=True)
        elif not self.quiet:
            (self.progress.write if self.progress else click.echo)(message)
        if self.progress:
            self.progress.update(1)

    def close(self) -> None:
        for bar in (self.tiles, self.progress):
            if bar:
                bar.close()


def _compare(input_path: Path, bundle: Path, specs: str, max_pixels: int) -> None:
    from mordasr.runtime.compare import compare_backends

    if input_path.is_dir():
        _fail("--compare-backends takes one image, not a folder")
    try:
        image = read_image(input_path, max_pixels=max_pixels)
        names = parse_list(specs, "--compare-backends")
        rows = compare_backends(bundle, image, list(names))
    except (MordasrError, ValueError) as err:
        _fail(str(err))
    click.echo(f"{input_path}: {names[0]} vs {names[1]}")
    click.echo(f"  {'output':<12} {'max abs':>12} {'mean abs':>12} {'atol':>8}  verdict (Polygraphy)")
    for row in rows:
        verdict = {True: "PASSED", False: "FAILED", None: "-- (pip install polygraphy)"}[row["passed"]]
        click.echo(f"  {row['output']:<12} {row['max_abs']:>12.3g} {row['mean_abs']:>12.3g} "
                   f"{row['atol']:>8.2g}  {verdict}")
    if any(row["passed"] is False for row in rows):
        _fail("the backends differ beyond the tolerances above", exit_code=1)


@click.command("mordasr-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output image file, or folder (created) when INPUT is a folder (required unless "
                   "--compare-backends).")
@click.option("--bundle", required=True, type=click.Path(path_type=Path),
              help="Bundle folder written by mordasr-export (holds manifest.json).")
@backend_option
@bucket_switch_option
@max_engines_option
@click.option("--compare-backends", default=None, metavar="A,B",
              help="Instead of writing outputs, run INPUT on two backends (e.g. onnxruntime,tensorrt or "
                   "onnxruntime,onnxruntime:refit) and print max/mean abs difference per graph.")
@threads_option()
@click.option("--format", "fmt", type=click.Choice(["png", "jpg", "webp", "tiff", "bmp"]), default=None,
              help="Output format [default: the output name's suffix; PNG for a folder's files "
                   "keeps each input's suffix].")
@max_pixels_option()
@tile_option
@click.option("--tile-overlap", type=click.IntRange(min=0), default=None,
              help="Overlap between tiles in input pixels [default: tile / 4].")
@click.option("--tile-window", type=click.Choice(["gaussian", "linear"]), default="gaussian", show_default=True,
              help="Blending weights across tile overlaps.")
@click.option("--tile-routing", is_flag=True,
              help="Score each tile for routing instead of the whole image (default: one score for "
                   "the whole image, the mean over up to four windows at its own resolution).")
@color_fix_option
@click.option("--bit-depth", type=click.Choice(["auto", "8", "16"]), default="auto", show_default=True,
              help="Output bits per channel: auto keeps 16-bit inputs 16-bit (PNG output only).")
@click.option("--no-alpha", is_flag=True,
              help="Composite transparent inputs over white instead of upscaling their alpha channel.")
@click.option("--skip-existing", is_flag=True,
              help="Skip inputs whose output file already exists (resumes an interrupted run: outputs "
                   "are written atomically, so an existing file is a complete one).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Restore a folder as a Ray Data pipeline over a pool of runtime workers (pip install "
                   "'mordasr[serve]'): the same files as without it, spread over cores or a cluster.")
@click.option("--address", default=None,
              help="--ray: Ray cluster to join (auto, ray://head:10001) [default: start a local Ray]. "
                   "INPUT and OUTPUT must then be on storage every node mounts.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="--ray: runtime workers (actors), each holding the bundle once [default: the "
                   "cluster's CPUs / --threads].")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GRACE_S, show_default=True,
              help="--ray: on SIGTERM/SIGINT, seconds to let images in flight finish (the others are left for "
                   "--skip-existing) before Ray is shut down and the command exits 0; a second signal exits at once.")
@click.option("--dry-run", is_flag=True, help="List what would be written, and run nothing.")
@verbosity
def main(input_path: Path, output: Path | None, bundle: Path, backend: str, bucket_switch: str | None,
         max_engines: int | None, compare_backends: str | None, threads: int | None, fmt: str | None,
         max_pixels: int, tile: int | None, tile_overlap: int | None, tile_window: str, tile_routing: bool,
         color_fix: str, bit_depth: str, no_alpha: bool, skip_existing: bool, use_ray: bool,
         address: str | None, workers: int | None, grace_s: float, dry_run: bool, quiet: bool) -> None:
    """Super-resolve INPUT (an image file, or a folder searched recursively) with a bundle.

    The degradation router scores each image; a folded bundle then runs the graphs of the
    nearest bucket, a gated bundle feeds the scores to its single UNet. Outputs are written
    atomically: a failed image leaves no file behind.

    Large images run in overlapping tiles (--tile); transparent images keep their alpha
    (upscaled on its own), 16-bit inputs give 16-bit PNG output, ICC profiles and EXIF are kept
    where the format allows. PNG and JPEG outputs are written a band of rows at a time as the
    tiles finish, so memory does not grow with the output; WebP, TIFF and BMP hold the 8-bit
    output for Pillow (3 bytes per output pixel, and Pillow's copy while it encodes).

    Folders: relative paths are kept, --skip-existing resumes a run, a bad file is reported and
    the run goes on. --ray runs the folder on a pool of Ray workers
    (local cores or a cluster) with the same outputs.

    Exit codes: 0 all images restored (or skipped); 1 some images of a folder failed (each is
    reported at the end); 2 bad bundle, bad arguments, or the single input image failed.
    """
    # after argument parsing, so --help is instant
    from mordasr.runtime.jobs import RestoreOptions, plan_jobs, restore_files
    from mordasr.runtime.pipeline import Restorer
    from mordasr.runtime.tiling import Tiling

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
    jobs = plan_jobs(input_path, output, suffix)
    if not jobs:
        _fail(f"{input_path}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    skipped = [j for j in jobs if skip_existing and j[1].exists()]
    jobs = [j for j in jobs if j not in skipped]
    if dry_run:
        for src, dst in jobs:
            click.echo(f"{src} -> {dst}")
        click.echo(f"dry run: {len(jobs)} to restore, {len(skipped)} skipped (output exists)")
        return
    if not jobs:
        if not quiet:
            click.echo(f"nothing to do: all {len(skipped)} outputs exist")
        return
    options = backend_options(backend, threads, bucket_switch, max_engines)
    tiling = Tiling(tile=tile, overlap=tile_overlap, per_tile_routing=tile_routing, window=tile_window)
    job_options = RestoreOptions(tiling=tiling, color_fix=color_fix, bit_depth=bit_depth, keep_alpha=not no_alpha,
                                 max_pixels=max_pixels)
    reporter = _Reporter(len(jobs), quiet)
    if use_ray:
        from mordasr.runtime.ray_folder import restore_with_ray
        from mordasr.runtime.signals import GracefulStop

        def stopping(signum: int) -> None:
            log.warning("%s: finishing the images in flight (up to %g s), then stopping; a second signal "
                        "stops at once", signal.Signals(signum).name, grace_s)

        try:
            with GracefulStop("mordasr-run", on_first=stopping) as stop:
                summary = restore_with_ray(jobs, bundle, backend, options, job_options, workers=workers,
                                           cpus_per_worker=threads or 1, address=address, on_result=reporter,
                                           stop=stop.requested, grace_s=grace_s, on_ray_started=stop.install)
        except MordasrError as err:
            _fail(str(err))
    else:
        try:
            restorer = Restorer(bundle, backend=backend, **options)
        except MordasrError as err:
            _fail(str(err))
        with restorer:
            for warning in restorer.device_warnings():
                log.warning("%s", warning)
            restore_files(restorer, jobs, job_options, on_result=reporter, on_tile=reporter.tile)
    reporter.close()
    if use_ray and not quiet:
        click.echo(f"ray: {summary.done} restored by {summary.workers} workers in {summary.seconds:.1f} s")
    if use_ray and summary.not_started:
        click.echo(f"mordasr-run: stopped; {summary.not_started} images not restored (run again with "
                   "--skip-existing to finish)", err=True)
    if skipped and not quiet:
        click.echo(f"skipped {len(skipped)} images whose output exists")
    if reporter.failures:
        if len(jobs) == 1 and not input_path.is_dir():
            sys.exit(EXIT_ERROR)
        click.echo(f"mordasr-run: {len(reporter.failures)} of {len(jobs)} images failed:", err=True)
        for _, reason in reporter.failures:  # each reason starts with its file's path
            click.echo(f"  {reason}", err=True)
        sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    main()
