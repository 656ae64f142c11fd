"""mordasr-serve: request limits (pure logic), and the real service started as a subprocess on
loopback with 2 Ray Serve replicas on the CPU, under a bounded concurrent load mixing good and
bad requests."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mordasr.errors import ImageError, ImageTooLarge
from mordasr.serving.requests import RequestError, RequestLimits, image_bytes, response_format, status_for


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(field: str, data: bytes, boundary: str = "mordasrboundary") -> tuple[str, bytes]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def test_request_limits_and_content_types():
    limits = RequestLimits(max_bytes=100, max_pixels=10)
    limits.check_declared_length("100")
    limits.check_declared_length(None)
    with pytest.raises(RequestError) as err:
        limits.check_declared_length("101")
    assert err.value.status == 413
    with pytest.raises(RequestError) as err:
        limits.check_declared_length("lots")
    assert err.value.status == 400
    with pytest.raises(RequestError) as err:
        limits.check_length(101)
    assert err.value.status == 413

    assert image_bytes("image/png", b"abc") == b"abc"
    assert image_bytes("application/octet-stream; x=1", b"abc") == b"abc"
    for kind, status in [("text/plain", 415), (None, 415), ("application/json", 415)]:
        with pytest.raises(RequestError) as err:
            image_bytes(kind, b"abc")
        assert err.value.status == status
    with pytest.raises(RequestError) as err:
        image_bytes("image/png", b"")
    assert err.value.status == 422
    content_type, body = _multipart("image", b"PNGDATA")
    assert image_bytes(content_type, body) == b"PNGDATA"
    content_type, body = _multipart("upload", b"OTHER")
    assert image_bytes(content_type, body) == b"OTHER"  # no 'image' field: the first file
    with pytest.raises(RequestError) as err:
        image_bytes("multipart/form-data; boundary=zz",
                    b"--zz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--zz--\r\n")
    assert err.value.status == 422 and "no file field" in str(err.value)

    assert response_format(None) == "PNG" and response_format("jpg") == "JPEG" and response_format("WEBP") == "WEBP"
    with pytest.raises(RequestError):
        response_format("gif")
    assert status_for(ImageTooLarge("x")) == 413 and status_for(ImageError("x")) == 422
    assert status_for(RuntimeError("x")) == 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, data: bytes, content_type: str, request_id: str, timeout: float = 120):
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": content_type, "X-Request-ID": request_id})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


MAX_BYTES, MAX_PIXELS = 60_000, 40 * 40


@pytest.fixture(scope="module")
def service(folded_bundle, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="needs Ray Serve (pip install 'mordasr[serve]')")
    work = tmp_path_factory.mktemp("serve")
    ready, port = work / "url", _free_port()
    exe = Path(sys.executable).with_name("mordasr-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mordasr.serving.cli"]
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen(cmd + ["--bundle", str(folded_bundle), "--port", str(port), "--replicas", "2",
                                   "--threads", "1", "--max-batch-size", "4", "--max-bytes", str(MAX_BYTES),
                                   "--max-pixels", str(MAX_PIXELS), "--ready-file", str(ready)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    deadline = time.time() + 240
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mordasr-serve did not start:\n" + (work / "serve.log").read_text()[-3000:])
        time.sleep(0.5)
    yield ready.read_text().strip(), proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_service_restores_like_mordasr_run_under_load(service, folded_bundle, tmp_path):
    url, _ = service
    rng = np.random.default_rng(7)
    sizes = [(16, 16), (16, 16), (12, 20), (16, 16), (24, 8), (12, 20)] * 2
    good = {f"good-{i}": _png(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for i, size in enumerate(sizes)}
    content_type, form = _multipart("image", good["good-0"])
    bad = {
        "corrupt": (b"\x89PNG\r\n\x1a\nnot really a png", "image/png", 422),
        "too-many-bytes": (b"\0" * (MAX_BYTES + 1), "image/png", 413),
        "too-many-pixels": (_png(np.zeros((41, 41, 3), np.uint8)), "image/png", 413),
        "wrong-type": (b"{\"image\": 1}", "application/json", 415),
        "form": (form, content_type, 200),
    }
    jobs = [(rid, data, "image/png") for rid, data in good.items()]
    jobs += [(rid, data, ctype) for rid, (data, ctype, _) in bad.items()]
    order = rng.permutation(len(jobs))
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda k: (jobs[k][0], _post(url, jobs[k][1], jobs[k][2], jobs[k][0])), order))

    # every request answered exactly once, with its own id
    ids = [rid for rid, _ in answers]
    assert sorted(ids) == sorted(j[0] for j in jobs)
    by_id = {rid: answer for rid, answer in answers}
    for rid, (status, headers, body) in by_id.items():
        headers = {k.lower(): v for k, v in headers.items()}
        assert headers.get("x-request-id") == rid
        if rid in bad:
            assert status == bad[rid][2], (rid, status, body[:200])
            if status != 200:
                import json

                error = json.loads(body)
                assert error["status"] == status and error["error"] and error["request_id"] == rid

    # outputs equal mordasr-run's for the same images
    from click.testing import CliRunner

    from mordasr.runtime.cli import main as run_main

    folder = tmp_path / "in"
    folder.mkdir()
    for rid, data in good.items():
        (folder / f"{rid}.png").write_bytes(data)
    result = CliRunner().invoke(run_main, [str(folder), "-o", str(tmp_path / "out"), "--bundle", str(folded_bundle),
                                           "--threads", "1", "-q"])
    assert result.exit_code == 0, result.output
    replicas = set()
    for rid in good:
        status, headers, body = by_id[rid]
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and headers["content-type"] == "image/png"
        replicas.add(headers["x-mordasr-replica"])
        served = np.asarray(Image.open(io.BytesIO(body)), dtype=np.int16)
        expected = np.asarray(Image.open(tmp_path / "out" / f"{rid}.png"), dtype=np.int16)
        assert served.shape == expected.shape
        # batched graph calls may round differently from single ones in the last float bit
        assert np.abs(served - expected).max() <= 1, rid
    form_png = np.asarray(Image.open(io.BytesIO(by_id["form"][2])), dtype=np.int16)
    assert np.abs(form_png - np.asarray(Image.open(tmp_path / "out" / "good-0.png"), dtype=np.int16)).max() <= 1
    assert len(replicas) == 2  # both replicas took requests
    largest = {}
    for _ in range(20):  # each /healthz answer comes from one replica: ask until both have answered
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=30) as response:
            health = json.loads(response.read())
        largest[health["replica"]] = health["largest_batch"]
        if len(largest) == 2:
            break
    assert max(largest.values()) > 1, largest  # @serve.batch really formed a batch of several requests


def test_service_health_and_methods(service):

    url, proc = service
    with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["mode"] == "folded" and health["scale"] == 4
    from mordasr.runtime import load_manifest

    bundle = Path(proc.args[proc.args.index("--bundle") + 1])
    assert health["bundle"] == bundle.name and "/" not in health["bundle"]  # no server path leaks
    assert health["bundle_hash"] == load_manifest(bundle).content_hash()
    assert {"served", "batches", "largest_batch", "replica"} <= set(health)
    request = urllib.request.Request(url, method="PUT", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 405
    status, _, body = _post(url + "?format=gif", _png(np.zeros((8, 8, 3), np.uint8)), "image/png", "fmt")
    assert status == 422 and b"unknown output format" in body
    status, headers, body = _post(url + "?format=jpg", _png(np.zeros((8, 8, 3), np.uint8)), "image/png", "jpg")
    assert status == 200 and Image.open(io.BytesIO(body)).format == "JPEG"
    assert proc.poll() is None  # the service outlived every bad request


def test_serve_cli_refuses_a_bad_bundle(tmp_path):
    pytest.importorskip("ray.serve", reason="needs Ray Serve (pip install 'mordasr[serve]')")
    from click.testing import CliRunner

    from mordasr.serving.cli import main as serve_main

    result = CliRunner().invoke(serve_main, ["--bundle", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
