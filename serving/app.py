"""The Ray Serve application behind ``mordasr-serve``.

Each replica holds one ``Restorer`` (the lean runtime: ONNX Runtime or TensorRT, no torch) and
answers ``POST /`` with the restored image and ``GET /healthz`` with the bundle it serves.
Requests that arrive together are restored as one ``@serve.batch``: one router call, then one
call per graph for each group of same-size, same-bucket images (``Restorer.restore_batch``).
Ray is imported lazily (polygraphy-style) so that the rest of mordasr never needs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from mordasr.errors import first_line
from mordasr.lazy import import_optional
from mordasr.serving.requests import RequestLimits

REQUEST_ID_HEADER = "x-request-id"


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
        return {"status": "ok", "replica": self.replica(), "bundle": Path(self.config.bundle).name,
                "bundle_hash": m.content_hash(), "mode": m.mode,
                "precision": m.precision, "preset": m.preset, "scale": m.scale, "backend": self.config.backend,
                "served": self.served, "batches": self.batches, "largest_batch": self.largest_batch}

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        from mordasr.serving.requests import RESPONSE_TYPES, image_bytes, response_format, status_for

        # Serve's proxy echoes (or makes) x-request-id on every answer; errors also carry it in JSON
        request_id = request.headers.get(REQUEST_ID_HEADER, "")
        headers = {"x-mordasr-replica": self.replica()}
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("healthz"):
            return JSONResponse(self.health(), headers=headers)
        if request.method != "POST":
            return JSONResponse({"error": "POST an image to restore it, or GET /healthz", "status": 405},
                                status_code=405, headers=headers)
        try:
            body = await self._read_body(request)
            data = image_bytes(request.headers.get("content-type"), body)
            fmt = response_format(request.query_params.get("format"))
            decoded = await asyncio.get_running_loop().run_in_executor(None, self._decode, data)
            answer = await self.restore_images((decoded, fmt))
            if isinstance(answer, Exception):
                raise answer
            payload, restored = answer
        except Exception as err:  # every failure is answered, with its reason, and the replica goes on
            status = status_for(err)
            message = first_line(err)
            if status == 500:
                message = f"{type(err).__name__}: {message}"
            return JSONResponse({"error": message, "status": status, "request_id": request_id},
                                status_code=status, headers=headers)
        self.served += 1
        headers.update({"x-mordasr-scores": ",".join(f"{v:.6g}" for v in restored.scores),
                        "x-mordasr-bucket": "" if restored.bucket is None else str(restored.bucket),
                        "x-mordasr-size": "{}x{}".format(*restored.output_size)})
        return Response(payload, media_type=RESPONSE_TYPES[fmt], headers=headers)

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

def build_app(config: ServiceConfig, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              max_ongoing_requests: int | None = None):
    """The bound Ray Serve application: ``replicas`` copies of ``RestoreService``."""
    serve = _import_ray()
    load_check(config)
    service = type("BatchedRestoreService", (RestoreService,), {
        "restore_images": serve.batch(max_batch_size=config.max_batch_size,
                                      batch_wait_timeout_s=config.batch_wait_timeout_s)(
            RestoreService.restore_images),
    })
    deployment = serve.deployment(service, name="mordasr", health_check_period_s=10, health_check_timeout_s=60)
    deployment = deployment.options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # One batch in flight per replica: the router then sends each request to whichever replica
        # is free. Measured on the tiny bundle, 2 replicas, 8 clients: a limit of 8 left p95 at
        # 11.5 s (requests queued behind a busy replica) against 4.5 s with a limit of 4.
        max_ongoing_requests=max_ongoing_requests or config.max_batch_size,
    )
    return deployment.bind(config)


def load_check(config: ServiceConfig) -> None:
    """Fail in the caller, with the runtime's one-line message, before Ray starts replicas
    that would each fail the same way."""
    from mordasr.runtime.manifest import load_manifest

    load_manifest(Path(config.bundle))

