"""The Ray Serve application behind ``mordasr-serve``: an ingress in front of restorer replicas.

``Ingress`` (one replica, no CPU of its own) takes every HTTP request: it answers ``GET /healthz``,
checks the body against the limits, and sends the image to a ``RestoreService`` replica through a
deployment handle. Each ``RestoreService`` holds one ``Restorer`` (the lean runtime: ONNX Runtime
or TensorRT, no torch); requests that arrive together are restored as one ``@serve.batch``: one
router call, then one call per graph for each group of same-size, same-bucket images.

What the ingress adds (serving/retry.py):
- a restore whose replica died is retried on another one (restoring is idempotent), up to
  ``RetryPolicy.attempts`` in all; spent retries answer 503 with ``Retry-After``;
- a request may carry a deadline (``x-mordasr-deadline-s``): past it the answer is 504 and the
  work is cancelled;
- each replica runs ``max_batch_size`` requests and queues ``max_queued_per_replica`` more; past
  that the handle refuses at once (Ray Serve's ``max_queued_requests``) and the answer is 503 with
  ``Retry-After``, so the backlog, and the memory it holds, stay bounded;
- ``drain()``: new requests get 503 while those in flight finish (``mordasr-serve``'s SIGTERM).

Answers carry ``x-mordasr-attempts``. Ray is imported lazily (polygraphy-style) so that the rest of
mordasr never needs it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from mordasr.errors import first_line
from mordasr.lazy import import_optional
from mordasr.serving.requests import RequestError, RequestLimits
from mordasr.serving.retry import DeadlineExceeded, ReplicasUnavailable, RetryPolicy, call_with_retries

REQUEST_ID_HEADER = "x-request-id"
DEADLINE_HEADER = "x-mordasr-deadline-s"
ATTEMPTS_HEADER = "x-mordasr-attempts"
DEFAULT_MAX_QUEUED_PER_REPLICA = 4
# A replica's health call waits in the same queue as its images; past this, /healthz answers from
# the ingress alone ("busy"), so a load balancer's probe never hangs behind a long restore.
HEALTH_TIMEOUT_S = 2.0


@dataclass
class ServiceConfig:
    """Everything a replica needs; plain data so Ray can ship it to each replica."""

    bundle: str
    backend: str = "onnxruntime"
    threads: int | None = None  # ONNX Runtime threads per graph (per replica)
    bucket_switch: str | None = None
    max_engines: int | None = None
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.01
    limits: RequestLimits = field(default_factory=RequestLimits)
    restore: dict = field(default_factory=dict)  # RestoreOptions fields (tiling, colour fix, ...)
    max_queued_per_replica: int = DEFAULT_MAX_QUEUED_PER_REPLICA
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def backend_options(self) -> dict:
        from mordasr.runtime.backends import backend_options

        return backend_options(self.backend, self.threads, self.bucket_switch, self.max_engines)


def _import_ray():
    return import_optional("ray.serve", "mordasr-serve")


class RestoreService:
    """One replica. Wrapped by ``serve.deployment`` in ``build_app``."""

    def __init__(self, config: ServiceConfig) -> None:
        from mordasr.runtime.jobs import RestoreOptions
        from mordasr.runtime.pipeline import Restorer

        self.config = config
        self.options = RestoreOptions(max_pixels=config.limits.max_pixels, **config.restore)
        self.restorer = Restorer(config.bundle, backend=config.backend, **config.backend_options())
        self.served = 0
        self.batches = 0  # batches run, and the largest, for /healthz
        self.largest_batch = 0

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy and replaces it.
        Its sessions are loaded, so only the bundle vanishing (a redeploy, a lost mount) is checked."""
        if not (Path(self.config.bundle) / "manifest.json").is_file():
            raise RuntimeError(f"bundle {self.config.bundle} is gone")

    def replica(self) -> str:
        from ray import serve

        try:
            return serve.get_replica_context().replica_tag
        except Exception:  # outside a replica (local testing mode)
            return "local"

    def health(self) -> dict:
        m = self.restorer.manifest
        # the bundle's name and content hash, never its path on the server
        return {"status": "ok", "replica": self.replica(), "pid": os.getpid(), "bundle": Path(self.config.bundle).name,
                "bundle_hash": m.content_hash(), "mode": m.mode,
                "precision": m.precision, "preset": m.preset, "scale": m.scale, "backend": self.config.backend,
                "served": self.served, "batches": self.batches, "largest_batch": self.largest_batch}

    async def restore(self, data: bytes, fmt: str) -> tuple[int, bytes | dict, dict]:
        """(status, restored image bytes or the JSON error, headers) for one encoded image. A bad
        image is an answer (4xx), never an exception: only a dying replica raises to the ingress."""
        from mordasr.serving.requests import status_for

        headers = {"x-mordasr-replica": self.replica()}
        try:
            decoded = await asyncio.get_running_loop().run_in_executor(None, self._decode, data)
            answer = await self.restore_images((decoded, fmt))
            if isinstance(answer, Exception):
                raise answer
            payload, restored = answer
        except Exception as err:  # every failure is answered, with its reason, and the replica goes on
            status = status_for(err)
            message = first_line(err) if status != 500 else f"{type(err).__name__}: {first_line(err)}"
            return status, {"error": message, "status": status}, headers
        self.served += 1
        headers.update({"x-mordasr-scores": ",".join(f"{v:.6g}" for v in restored.scores),
                        "x-mordasr-bucket": "" if restored.bucket is None else str(restored.bucket),
                        "x-mordasr-size": "{}x{}".format(*restored.output_size)})
        return 200, payload, headers

    def _decode(self, data: bytes):
        from mordasr.runtime.images import decode_image

        return decode_image(data, "request body", self.options.max_pixels)

    async def restore_images(self, items: list) -> list:
        """Replaced by a ``serve.batch`` handler in ``build_app``: a list of (decoded image,
        response format) in, a list of (encoded bytes, ``Restored``) (or the exception that
        image raised) out. A large image is encoded band by band as it is restored, so a
        replica holds its compressed bytes, not a float output."""
        return await asyncio.get_running_loop().run_in_executor(None, self._restore_list, items)

    def _restore_list(self, items: list) -> list:
        from mordasr.runtime.jobs import each_or_error, encode_restored

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(items))
        return each_or_error(lambda batch: encode_restored(self.restorer, batch, self.options), items)

def replica_lost(err: BaseException) -> bool:
    """Whether a handle call failed because its replica died or became unreachable (retryable)."""
    exceptions = import_optional("ray.exceptions", "mordasr-serve")
    return isinstance(err, (exceptions.RayActorError, exceptions.ActorUnavailableError))


class Ingress:
    """The HTTP entry: limits, retries, backpressure and drain in front of the restorers."""

    def __init__(self, restorer, config: ServiceConfig) -> None:
        self.restorer = restorer
        self.config = config
        self.draining = False
        self.in_flight = 0

    def drain(self) -> int:
        """Refuse new requests from now on (503); returns the number still in flight."""
        self.draining = True
        return self.in_flight

    def pending(self) -> int:
        return self.in_flight

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        from mordasr.serving.requests import RESPONSE_TYPES, image_bytes, response_format, status_for

        # Serve's proxy echoes (or makes) x-request-id on every answer; errors also carry it in JSON
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        retry_after = {"Retry-After": str(self.config.retry.retry_after_s)}

        def error(status: int, message: str, headers: dict | None = None):
            return JSONResponse({"error": message, "status": status, "request_id": request_id},
                                status_code=status, headers=headers)

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("healthz"):
            return JSONResponse({**await self._replica_health(), "draining": self.draining,
                                 "in_flight": self.in_flight})
        if request.method != "POST":
            return error(405, "POST an image to restore it, or GET /healthz")
        if self.draining:
            return error(503, "the service is shutting down; send the request again elsewhere or later",
                         {**retry_after, "Connection": "close"})
        self.in_flight += 1
        attempts = 0
        try:
            body = await self._read_body(request)
            data = image_bytes(request.headers.get("content-type"), body)
            fmt = response_format(request.query_params.get("format"))
            deadline = _deadline(request.headers.get(DEADLINE_HEADER))
            (status, payload, headers), attempts = await call_with_retries(
                lambda: self.restorer.restore.remote(data, fmt), replica_lost, self.config.retry, deadline)
        except ReplicasUnavailable as err:
            return error(503, str(err), {**retry_after, ATTEMPTS_HEADER: str(err.attempts)})
        except DeadlineExceeded as err:
            return error(504, str(err), {ATTEMPTS_HEADER: str(err.attempts)})
        except Exception as err:
            if isinstance(err, import_optional("ray.serve.exceptions", "mordasr-serve").BackPressureError):
                return error(503, "every replica is busy and its queue is full; try again shortly",
                             {**retry_after, ATTEMPTS_HEADER: "1"})
            status = status_for(err)
            return error(status, first_line(err) if status != 500 else f"{type(err).__name__}: {first_line(err)}",
                         {ATTEMPTS_HEADER: str(attempts)})
        finally:
            self.in_flight -= 1
        headers[ATTEMPTS_HEADER] = str(attempts)
        if status != 200:
            return JSONResponse({**payload, "request_id": request_id}, status_code=status, headers=headers)
        return Response(payload, media_type=RESPONSE_TYPES[fmt], headers=headers)

    async def _replica_health(self) -> dict:
        backpressure = import_optional("ray.serve.exceptions", "mordasr-serve").BackPressureError
        try:
            return await asyncio.wait_for(self.restorer.health.remote(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, backpressure):
            return {"status": "busy",
                    "detail": f"no replica answered within {HEALTH_TIMEOUT_S:g} s: all are restoring"}

    async def _read_body(self, request) -> bytes:
        """The body, refused with 413 as soon as it (or its Content-Length) passes the limit."""
        limits = self.config.limits
        limits.check_declared_length(request.headers.get("content-length"))
        chunks, received = [], 0
        async for chunk in request.stream():
            received += len(chunk)
            limits.check_length(received)
            chunks.append(chunk)
        return b"".join(chunks)


def _deadline(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RequestError(400, f"bad {DEADLINE_HEADER} header {header!r}: give seconds, a positive number")
    return seconds


def build_app(config: ServiceConfig, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              max_ongoing_requests: int | None = None, grace_s: float = 30.0):
    """The bound Ray Serve application: an ``Ingress`` in front of ``replicas`` copies of
    ``RestoreService``."""
    serve = _import_ray()
    load_check(config)
    service = type("BatchedRestoreService", (RestoreService,), {
        "restore_images": serve.batch(max_batch_size=config.max_batch_size,
                                      batch_wait_timeout_s=config.batch_wait_timeout_s)(
            RestoreService.restore_images),
    })
    ongoing = max_ongoing_requests or config.max_batch_size
    restorer = serve.deployment(service, name="restorer", health_check_period_s=10, health_check_timeout_s=60)
    restorer = restorer.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # One batch in flight per replica: the router then sends each request to whichever replica
        # is free. Measured on the tiny bundle, 2 replicas, 8 clients: a limit of 8 left p95 at
        # 11.5 s (requests queued behind a busy replica) against 4.5 s with a limit of 4.
        max_ongoing_requests=ongoing,
        # The ingress is the handle's one caller, so this bounds the whole backlog.
        max_queued_requests=config.max_queued_per_replica * replicas,
        graceful_shutdown_timeout_s=grace_s,
    )
    capacity = (ongoing + config.max_queued_per_replica) * replicas
    ingress = serve.deployment(Ingress, name="mordasr").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        # Room for every request the restorers can hold, and for the quick 4xx/503 answers besides.
        max_ongoing_requests=2 * capacity + 16, max_queued_requests=capacity,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry.retry_after_s},
        graceful_shutdown_timeout_s=grace_s,
    )
    return ingress.bind(restorer.bind(config), config)


def load_check(config: ServiceConfig) -> None:
    """Fail in the caller, with the runtime's one-line message, before Ray starts replicas
    that would each fail the same way."""
    from mordasr.runtime.manifest import load_manifest

    load_manifest(Path(config.bundle))

