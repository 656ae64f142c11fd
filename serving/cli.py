"""``mordasr-serve``: restore images over HTTP with Ray Serve replicas of the lean runtime."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from mordasr.cli_errors import failer
from mordasr.errors import MordasrError
from mordasr.lazy import import_optional
from mordasr.runtime.cli_options import (
    backend_option,
    bucket_switch_option,
    color_fix_option,
    max_pixels_option,
    threads_option,
    tile_option,
    verbosity,
)
from mordasr.runtime.signals import DEFAULT_GRACE_S, GracefulStop, run_bounded, wait_until
from mordasr.runtime.tiling import Tiling
from mordasr.serving.app import DEFAULT_MAX_QUEUED_PER_REPLICA
from mordasr.serving.requests import DEFAULT_MAX_BYTES
from mordasr.serving.retry import DEFAULT_ATTEMPTS

_fail = failer("mordasr-serve")


@click.command("mordasr-serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path),
              help="Bundle folder written by mordasr-export (holds manifest.json).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP proxy listens on (0.0.0.0 to accept other machines).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--route", default="/", show_default=True, help="URL prefix of the application.")
@click.option("--address", default=None,
              help="Ray cluster to join (e.g. ray://head:10001 or auto) [default: start a local Ray].")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replicas of the runtime; each holds the bundle's graphs (or engines) once.")
@click.option("--cpus-per-replica", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Ray CPUs reserved per replica.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="GPU share per replica (e.g. 0.5 puts two replicas on one GPU); 0 on CPU hosts.")
@backend_option
@threads_option("ONNX Runtime threads per graph in each replica [default: --cpus-per-replica, at least 1].")
@bucket_switch_option
@click.option("--max-batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests restored together by one replica (same-size images share graph calls).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long a replica waits to fill a batch.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_BYTES, show_default=True,
              help="Largest request body; larger ones get 413.")
@max_pixels_option("Largest input image in pixels; larger ones get 413 before their pixels are decoded.")
@tile_option
@color_fix_option
@click.option("--max-queued-per-replica", type=click.IntRange(min=1), default=DEFAULT_MAX_QUEUED_PER_REPLICA,
              show_default=True,
              help="Requests waiting per replica beyond the batch it runs; past that the answer is 503 with "
                   "Retry-After at once, so the backlog (and its memory) stays bounded.")
@click.option("--attempts", type=click.IntRange(min=1), default=DEFAULT_ATTEMPTS, show_default=True,
              help="Tries of a request whose replica died (restoring is idempotent); then 503 with Retry-After.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=DEFAULT_GRACE_S, show_default=True,
              help="On SIGTERM/SIGINT: seconds to finish the requests in flight (new ones get 503) before Ray "
                   "shuts down and the command exits 0; a second signal exits at once.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Write the service URL to this file once it answers (for scripts and tests).")
@verbosity
def main(bundle: Path, host: str, port: int, route: str, address: str | None, replicas: int,
         cpus_per_replica: float, gpus_per_replica: float, backend: str, threads: int | None,
         bucket_switch: str | None, max_batch_size: int, batch_wait_ms: float, max_bytes: int, max_pixels: int,
         tile: int | None, color_fix: str, max_queued_per_replica: int, attempts: int, grace_s: float,
         ready_file: Path | None) -> None:
    """Serve BUNDLE over HTTP: POST an image, get the restored image back.

    \b
      curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/ -o out.png
      curl -F image=@photo.jpg 'http://127.0.0.1:8000/?format=webp' -o out.webp
      curl http://127.0.0.1:8000/healthz

    The body is the image's bytes (image/* or application/octet-stream) or multipart/form-data
    with an 'image' field. The answer is the restored image (PNG unless ?format= says otherwise),
    with headers x-mordasr-scores, x-mordasr-bucket and x-request-id. Errors are JSON
    {"error", "status"}: 413 for a body or image over the limits, 415 for another content type,
    422 for a corrupt image, 500 for a runtime failure; the replica goes on serving.

    A request whose replica dies is retried on another (--attempts; the answer's
    x-mordasr-attempts header counts them); when every replica is busy and its queue is full
    (--max-queued-per-replica) the answer is 503 with Retry-After at once. A request may set
    x-mordasr-deadline-s: past it the answer is 504 and its work is dropped.

    Requests arriving together are batched per replica (--max-batch-size, --batch-wait-ms).
    Starts a local Ray (or joins --address) and runs until SIGTERM or Ctrl-C: then new requests
    get 503, those in flight finish (up to --grace seconds), Ray shuts down and the command exits 0.
    """
    from mordasr.serving.app import ServiceConfig, build_app
    from mordasr.serving.requests import RequestLimits
    from mordasr.serving.retry import RetryPolicy

    config = ServiceConfig(bundle=str(bundle.resolve()), backend=backend,
                           threads=threads or max(1, int(cpus_per_replica)), bucket_switch=bucket_switch,
                           max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
                           limits=RequestLimits(max_bytes, max_pixels),
                           restore={"tiling": Tiling(tile=tile), "color_fix": color_fix},
                           max_queued_per_replica=max_queued_per_replica, retry=RetryPolicy(attempts=attempts))
    with GracefulStop("mordasr-serve") as stop:
        try:
            app = build_app(config, replicas=replicas, num_cpus=cpus_per_replica, num_gpus=gpus_per_replica,
                            grace_s=grace_s)
        except MordasrError as err:
            _fail(str(err))
        url = start(app, host, port, route, address)
        stop.install()  # Ray took SIGTERM over while starting
        click.echo(f"mordasr-serve: {replicas} replica(s) of {bundle} on {url} (GET {url.rstrip('/')}/healthz); "
                   "Ctrl-C or SIGTERM stops", err=True)
        if ready_file:
            from mordasr.runtime.atomic import atomic_write

            atomic_write(ready_file, url + "\n")
        stop.wait()
        name = signal.Signals(stop.signal or signal.SIGTERM).name
        click.echo(f"mordasr-serve: {name}: refusing new requests, finishing those in flight (up to {grace_s:g} s; "
                   "a second signal stops at once)", err=True)
        begun = time.monotonic()
        left = drain(grace_s)
        stopped = shutdown(timeout_s=30.0)
        click.echo(f"mordasr-serve: stopped in {time.monotonic() - begun:.1f} s"
                   + (f"; {left} request(s) still in flight were dropped" if left else "")
                   + ("" if stopped else "; Ray did not shut down in 30 s and was left to exit with us"), err=True)


def drain(grace_s: float) -> int:
    """Make the ingress refuse new requests and wait (up to ``grace_s``) for those in flight;
    returns how many are still in flight."""
    serve = import_optional("ray.serve", "mordasr-serve")
    try:
        ingress = serve.get_app_handle("mordasr")
        pending = [ingress.drain.remote().result(timeout_s=10)]
    except Exception:  # no app (it failed to deploy) or Ray already gone: nothing to drain
        return 0

    def finished() -> bool:
        try:
            pending[0] = ingress.pending.remote().result(timeout_s=5)
        except Exception:
            pending[0] = 0
        return pending[0] == 0

    wait_until(finished, grace_s, poll_s=0.2)
    return pending[0]


def start(app, host: str, port: int, route: str = "/", address: str | None = None,
          num_cpus: int | None = None) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy ``app``; returns its URL."""
    ray, serve = import_optional("ray", "mordasr-serve"), import_optional("ray.serve", "mordasr-serve")

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    quiet = {"log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(app, name="mordasr", route_prefix=route, blocking=False, logging_config=quiet)
    return f"http://{host}:{port}{route}"


def shutdown(timeout_s: float = 30.0) -> bool:
    """Shut Serve (its replicas wait for their own requests) and Ray down; whether that finished
    within ``timeout_s``. When a signal sent to the whole process group has already killed Ray's
    processes, ``serve.shutdown`` can wait for them forever; it is then left behind."""
    ray, serve = import_optional("ray", "mordasr-serve"), import_optional("ray.serve", "mordasr-serve")

    def stop_all() -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    return run_bounded(stop_all, timeout_s)


if __name__ == "__main__":
    main()
