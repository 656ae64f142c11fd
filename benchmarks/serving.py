"""``mordasr-bench-serve``: Ray Serve throughput and latency from 1 to N replicas, in one run.

Each configuration (replicas x ONNX Runtime threads per replica) is deployed in turn on the same
local Ray, warmed up, then loaded by a fixed number of concurrent HTTP clients sending the same
set of images; requests/s and client-side latency percentiles are measured per configuration,
and the scaling ratios are computed against the first one. A configuration's errors are
counted, never dropped.
"""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np

from mordasr.errors import MordasrError
from mordasr.runtime.cli_options import verbosity
from mordasr.serving.retry import DEFAULT_ATTEMPTS


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _post(url: str, data: bytes) -> tuple[int, float]:
    start = time.perf_counter()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except OSError:
        status = -1  # connection refused or reset
    return status, (time.perf_counter() - start) * 1e3


def _load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    payloads = [images[i % len(images)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(lambda data: _post(url, data), payloads))
    wall = time.perf_counter() - start
    ok = np.array([ms for status, ms in answers if status == 200])
    errors = sum(1 for status, _ in answers if status != 200)
    stats = {"requests": requests, "errors": errors, "seconds": wall,
             "requests_per_s": (requests - errors) / wall}
    if ok.size:
        stats.update({f"p{q}_ms": float(np.percentile(ok, q)) for q in (50, 95, 99)})
    return stats


def _direct(bundle: Path, payloads: list[bytes], count: int) -> dict:
    """The same restores, one after another, by the runtime in this process with 1 thread:
    what serving adds (HTTP, Ray, PNG coding) is the difference to the 1x1 row."""
    from mordasr.runtime.jobs import RestoreOptions, restore_bytes
    from mordasr.runtime.pipeline import Restorer

    restorer = Restorer(bundle, threads=1)
    restore_bytes(restorer, payloads[0], RestoreOptions())  # sessions are created on first use
    start = time.perf_counter()
    for i in range(count):
        restore_bytes(restorer, payloads[i % len(payloads)], RestoreOptions())
    seconds = time.perf_counter() - start
    return {"requests": count, "seconds": seconds, "requests_per_s": count / seconds,
            "ms_per_request": seconds / count * 1e3}


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'1x1,2x1,1x2' -> [(replicas, threads), ...]"""
    from mordasr.runtime.cli_options import parse_list

    configs = []
    for item in parse_list(text, "--configs"):
        try:
            replicas, threads = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise MordasrError(f"bad configuration {item!r}: write REPLICASxTHREADS, e.g. 2x1") from None
        if replicas < 1 or threads < 1:
            raise MordasrError(f"bad configuration {item!r}: replicas and threads must be >= 1")
        configs.append((replicas, threads))
    return configs


def run_serving_benchmark(bundle: Path, configs: list[tuple[int, int]], requests: int, concurrency: int,
                          lr_size: int, max_batch_size: int, seed: int = 0, progress=print) -> dict:
    import os

    from mordasr.benchmarks.measure import describe_machine
    from mordasr.lazy import import_optional

    serve = import_optional("ray.serve", "mordasr-bench-serve")
    from mordasr.runtime.manifest import load_manifest
    from mordasr.serving.app import ServiceConfig, build_app
    from mordasr.serving.cli import shutdown, start

    manifest = load_manifest(bundle)
    rng = np.random.default_rng(seed)
    images = [_png(rng.integers(0, 255, (lr_size, lr_size, 3), dtype=np.uint8)) for _ in range(8)]
    progress("timing the runtime in this process (no HTTP, no Ray), 1 thread")
    direct = _direct(bundle, images, min(requests, 16))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = max(os.cpu_count() or 1, max(r * t for r, t in configs))
    rows = []
    try:
        for replicas, threads in configs:
            config = ServiceConfig(bundle=str(bundle.resolve()), threads=threads, max_batch_size=max_batch_size)
            progress(f"deploying {replicas} replica(s) x {threads} thread(s)")
            url = start(build_app(config, replicas=replicas, num_cpus=threads), "127.0.0.1", port, num_cpus=cpus)
            _load(url, images, 2 * replicas * concurrency, concurrency)  # warm every replica's sessions
            progress(f"loading {replicas}x{threads} with {requests} requests")
            stats = _load(url, images, requests, concurrency)
            rows.append({"replicas": replicas, "threads_per_replica": threads, **stats})
            serve.delete("mordasr")
    finally:
        shutdown()
    base = rows[0]
    for row in rows:
        row["throughput_vs_first"] = row["requests_per_s"] / base["requests_per_s"]
        if "p50_ms" in row and "p50_ms" in base:
            row["p50_vs_first"] = row["p50_ms"] / base["p50_ms"]
    return {"direct": direct, "bundle": str(bundle), "preset": manifest.preset, "mode": manifest.mode,
            "precision": manifest.precision,
            "lr_size": lr_size, "output_size": lr_size * manifest.scale, "requests": requests,
            "concurrency": concurrency, "max_batch_size": max_batch_size, "machine": describe_machine(),
            "rows": rows}


def run_chaos_benchmark(bundle: Path, replicas: int, requests: int, clients: int, lr_size: int, bad_every: int,
                        kill_after_s: float, attempts: int, max_batch_size: int, seed: int = 0,
                        progress=print) -> dict:
    """Deploy ``replicas`` replicas, warm them, and run ``chaos_load`` (benchmarks/chaos.py)."""
    import os

    from mordasr.benchmarks.chaos import chaos_load
    from mordasr.benchmarks.measure import describe_machine
    from mordasr.serving.app import ServiceConfig, build_app
    from mordasr.serving.cli import shutdown, start
    from mordasr.serving.retry import RetryPolicy

    rng = np.random.default_rng(seed)
    images = [_png(rng.integers(0, 255, (lr_size, lr_size, 3), dtype=np.uint8)) for _ in range(8)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServiceConfig(bundle=str(bundle.resolve()), threads=1, max_batch_size=max_batch_size,
                           retry=RetryPolicy(attempts=attempts))
    try:
        progress(f"deploying {replicas} replica(s)")
        url = start(build_app(config, replicas=replicas, num_cpus=1), "127.0.0.1", port,
                    num_cpus=max(os.cpu_count() or 1, replicas))
        _load(url, images, 2 * replicas * clients, clients)  # warm every replica's sessions
        progress(f"{requests} requests from {clients} clients; one replica killed after {kill_after_s:g} s")
        results = chaos_load(url, images, requests, clients, bad_every, kill_after_s, replicas, progress)
    finally:
        shutdown()
    return {**results, "chaos": True, "bundle": str(bundle), "replicas": replicas, "requests": requests,
            "clients": clients, "lr_size": lr_size, "bad_every": bad_every, "kill_after_s": kill_after_s,
            "attempts": attempts, "machine": describe_machine()}


def write_serving_report(results: dict, out_dir: Path) -> list[Path]:
    from mordasr.runtime.atomic import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    if results.get("chaos"):
        from mordasr.benchmarks.chaos import chaos_report

        return [atomic_write(out_dir / "report.md", "\n".join(chaos_report(results)) + "\n"),
                atomic_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n")]
    lines = [f"# Ray Serve scaling: {results['preset']} {results['mode']} bundle ({results['precision']})", "",
             f"{results['requests']} requests of {results['lr_size']}x{results['lr_size']} px "
             f"(-> {results['output_size']} px), {results['concurrency']} concurrent HTTP clients on loopback, "
             f"max batch {results['max_batch_size']} per replica; ONNX Runtime on the CPU. "
             f"Machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cores', '?')} cores.", "",
             f"Runtime alone (this process, 1 thread, decode + restore + PNG encode, one after another): "
             f"{results['direct']['requests_per_s']:.2f} requests/s, "
             f"{results['direct']['ms_per_request']:.0f} ms each.",
             "",
             "| replicas | threads/replica | requests/s | x first | p50 ms | p95 ms | p99 ms | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        lines.append(f"| {row['replicas']} | {row['threads_per_replica']} | {row['requests_per_s']:.2f} | "
                     f"{row['throughput_vs_first']:.2f} | {row.get('p50_ms', float('nan')):.0f} | "
                     f"{row.get('p95_ms', float('nan')):.0f} | {row.get('p99_ms', float('nan')):.0f} | "
                     f"{row['errors']} |")
    lines += ["", "Latency is client-side (request sent to last byte received), so it includes queueing "
              "behind the other clients' requests."]
    return [atomic_write(out_dir / "report.md", "\n".join(lines) + "\n"),
            atomic_write(out_dir / "results.json", json.dumps(results, indent=2) + "\n")]


@click.command("mordasr-bench-serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder to serve.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for report.md and results.json.")
@click.option("--configs", default="1x1,2x1,1x2", show_default=True,
              help="Comma-separated REPLICASxTHREADS configurations, measured in this order; ratios "
                   "are against the first.")
@click.option("--requests", type=click.IntRange(min=1), default=64, show_default=True,
              help="Timed requests per configuration.")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent HTTP clients.")
@click.option("--lr-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Side of the (random) low-resolution request images, px.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--chaos", is_flag=True,
              help="Instead of scaling: serve with the first configuration's replicas, send --requests from "
                   "--concurrency clients with one in --bad-every corrupt, kill one replica (SIGKILL) after "
                   "--kill-after seconds, and count what was answered, retried and lost.")
@click.option("--kill-after", type=click.FloatRange(min=0), default=4.0, show_default=True,
              help="--chaos: seconds into the load when a replica is killed.")
@click.option("--bad-every", type=click.IntRange(min=2), default=10, show_default=True,
              help="--chaos: one request in this many is a corrupt PNG (must get 422).")
@click.option("--attempts", type=click.IntRange(min=1), default=DEFAULT_ATTEMPTS, show_default=True,
              help="--chaos: the service's --attempts (1: no retry, to see what a dead replica costs without).")
@verbosity
def main(bundle: Path, out_dir: Path, configs: str, requests: int, concurrency: int, lr_size: int,
         max_batch_size: int, chaos: bool, kill_after: float, bad_every: int, attempts: int, quiet: bool) -> None:
    """Measure Ray Serve requests/s and latency of BUNDLE from 1 to N replicas in one run, or
    (--chaos) what a replica killed under load costs."""
    from mordasr.cli_errors import fail_on_errors
    from mordasr.lazy import import_optional

    with fail_on_errors("mordasr-bench-serve"):
        import_optional("ray.serve", "mordasr-bench-serve")
        parsed = parse_configs(configs)
        progress = (lambda _m: None) if quiet else (lambda m: click.echo(f"bench-serve: {m}", err=True))
        if chaos:
            results = run_chaos_benchmark(bundle, parsed[0][0], requests, concurrency, lr_size, bad_every,
                                          kill_after, attempts, max_batch_size, progress=progress)
        else:
            results = run_serving_benchmark(bundle, parsed, requests, concurrency, lr_size, max_batch_size,
                                            progress=progress)
    files = write_serving_report(results, out_dir)
    if not quiet:
        click.echo(files[0].read_text())


if __name__ == "__main__":
    main()
