"""``mordasr-run IN -o OUT --ray``: the folder job as a Ray Data pipeline.

The pipeline is a list of (input, output) paths -> ``map_batches`` over a pool of runtime
actors (each holds one ``Restorer``) -> one summary row per image, streamed back to the driver
for the progress bar. Each actor decodes, restores and writes its images itself with the same
``restore_file`` as the single-process mode, so the files are identical and every write is
atomic; outputs that exist are skipped by ``--skip-existing``, which makes an interrupted run
resumable. On a multi-node cluster, IN and OUT must be on a filesystem every node mounts.

A stop request (``stop``: set by SIGTERM/SIGINT in ``mordasr-run``) reaches the actors through a
small flag actor: images not yet started are left for a rerun with ``--skip-existing``, those in
flight finish within ``grace_s``, and Ray is shut down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mordasr.runtime.jobs import RestoreOptions

STOPPED = "stopped before it started"


@dataclass
class BatchSummary:
    done: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, one-line reason)
    workers: int = 0
    seconds: float = 0.0
    not_started: int = 0  # left by a stop request, for a rerun with --skip-existing


class StopFlag:
    """A Ray actor every worker asks before each image."""

    def __init__(self) -> None:
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


class RestoreWorker:
    """A Ray Data actor: one runtime, restoring the files of the batches it is given."""

    def __init__(self, bundle: str, backend: str, backend_options: dict, options: RestoreOptions, stop) -> None:
        from mordasr.runtime.pipeline import Restorer

        self.restorer = Restorer(bundle, backend=backend, **backend_options)
        self.options = options
        self.stop = stop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        from mordasr.runtime.jobs import describe, failure_reason, restore_file

        errors, messages = [], []
        for src, dst in zip(batch["src"], batch["dst"]):
            if ray.get(self.stop.is_set.remote()):
                errors.append(STOPPED)
                messages.append("")
                continue
            start = time.perf_counter()
            try:
                restored = restore_file(self.restorer, Path(src), Path(dst), self.options)
            except Exception as err:  # reported in the summary; the other files go on
                errors.append(failure_reason(src, err))
                messages.append("")
            else:
                errors.append("")
                messages.append(describe(src, dst, restored, self.restorer.manifest.mode,
                                         time.perf_counter() - start))
        return {"src": batch["src"], "error": np.array(errors, dtype=object),
                "message": np.array(messages, dtype=object)}


def restore_with_ray(jobs: list[tuple[Path, Path]], bundle: Path, backend: str, backend_options: dict,
                     options: RestoreOptions, workers: int | None = None, cpus_per_worker: float = 1.0,
                     address: str | None = None, on_result: Callable[[str, str, str], None] | None = None,
                     stop: threading.Event | None = None, grace_s: float = 30.0,
                     on_ray_started: Callable[[], None] | None = None) -> BatchSummary:
    """Restore ``jobs`` on a pool of Ray actors; ``on_result(src, error, message)`` per image.
    Once ``stop`` is set, images not started are skipped and the wait for those in flight lasts
    at most ``grace_s``. ``on_ray_started`` runs once Ray is up (to take back SIGTERM from it)."""
    from mordasr.lazy import import_optional

    ray = import_optional("ray", "--ray")
    import_optional("ray.data", "--ray")
    from mordasr.runtime.manifest import load_manifest

    load_manifest(bundle)  # one clear error here rather than one per actor
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    if on_ray_started is not None:
        on_ray_started()
    summary = BatchSummary()
    start = time.perf_counter()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the caller draws one bar over images, not blocks
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(cpus_per_worker, 1e-3)))
        summary.workers = workers = max(1, min(workers, len(jobs)))
        flag = ray.remote(num_cpus=0)(StopFlag).remote()
        items = [{"src": str(src), "dst": str(dst)} for src, dst in jobs]
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), workers * 4))
        results = dataset.map_batches(
            RestoreWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker, batch_format="numpy",
            fn_constructor_kwargs={"bundle": str(bundle), "backend": backend,
                                   "backend_options": backend_options, "options": options, "stop": flag})
        if stop is not None:  # the flag goes up as soon as the stop comes, not at the next row
            threading.Thread(target=lambda: stop.wait() and flag.set.remote(), daemon=True).start()
        deadline = None
        for row in results.iter_rows():
            if stop is not None and stop.is_set() and deadline is None:
                deadline = time.monotonic() + grace_s
            if row["error"] == STOPPED:
                continue
            if row["error"]:
                summary.failures.append((row["src"], row["error"]))
            else:
                summary.done += 1
            if on_result:
                on_result(row["src"], row["error"], row["message"])
            if deadline is not None and time.monotonic() > deadline:
                break
        summary.not_started = len(jobs) - summary.done - len(summary.failures)
    finally:
        summary.seconds = time.perf_counter() - start
        if started:
            ray.shutdown()
    return summary
