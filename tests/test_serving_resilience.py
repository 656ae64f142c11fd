"""mordasr-serve under failure: a restore whose replica died is retried (serving/retry.py and the
ingress, with a stand-in for the deployment handle: no Ray needed), a burst past the queue limit
gets 503 with Retry-After, and SIGTERM drains the requests in flight and exits 0 (the real
service, as a subprocess)."""

from __future__ import annotations

import asyncio

import pytest

from mordasr.serving.retry import DeadlineExceeded, ReplicasUnavailable, RetryPolicy, call_with_retries


class Lost(Exception):
    """Stands for a replica's death."""


def _run(coroutine):
    return asyncio.run(coroutine)


def _calls(*outcomes):
    """A call whose n-th invocation raises or returns ``outcomes[n]`` (after ``delay`` seconds when
    an outcome is a (delay, value) pair); ``made`` counts the invocations."""
    made = []

    async def call():
        outcome = outcomes[len(made)]
        made.append(outcome)
        if isinstance(outcome, tuple):
            await asyncio.sleep(outcome[0])
            outcome = outcome[1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return call, made


FAST = RetryPolicy(attempts=3, backoff_s=0.01)


def test_a_lost_attempt_is_made_again():
    call, made = _calls(Lost(), "restored")
    assert _run(call_with_retries(call, lambda e: isinstance(e, Lost), FAST)) == ("restored", 2)
    assert len(made) == 2


def test_spent_attempts_raise_replicas_unavailable():
    call, made = _calls(Lost(), Lost(), Lost(), "never")
    with pytest.raises(ReplicasUnavailable) as err:
        _run(call_with_retries(call, lambda e: isinstance(e, Lost), FAST))
    assert err.value.attempts == 3 and len(made) == 3


def test_the_requests_own_error_is_not_retried():
    call, made = _calls(ValueError("bad image"), "never")
    with pytest.raises(ValueError, match="bad image"):
        _run(call_with_retries(call, lambda e: isinstance(e, Lost), FAST))
    assert len(made) == 1


def test_a_deadline_cancels_the_attempt_in_flight():
    cancelled = []

    async def slow():
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(DeadlineExceeded) as err:
        _run(call_with_retries(slow, lambda e: False, FAST, deadline_s=0.05))
    assert err.value.attempts == 1 and cancelled == [True]
    call, made = _calls(Lost(), Lost(), "never")  # no time left for another attempt after the backoff
    with pytest.raises(DeadlineExceeded):
        _run(call_with_retries(call, lambda e: isinstance(e, Lost), RetryPolicy(backoff_s=1.0), deadline_s=0.2))
    assert len(made) == 1


class _Handle:
    """Stands for the ingress's handle to the restorer deployment: ``restore.remote(...)`` and
    ``health.remote()`` return awaitables, as Ray Serve's DeploymentResponse is."""

    def __init__(self, *outcomes) -> None:
        self.call, self.made = _calls(*outcomes)
        self.restore = self.health = self

    def remote(self, *args):
        return self.call()


def _request(body: bytes, headers: dict | None = None):
    from starlette.requests import Request

    raw = [(k.lower().encode(), v.encode()) for k, v in {"content-type": "image/png", **(headers or {})}.items()]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": b"", "root_path": ""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _ingress(*outcomes):
    pytest.importorskip("ray.serve", reason="needs Ray Serve (pip install 'mordasr[serve]')")
    from mordasr.serving.app import Ingress, ServiceConfig

    handle = _Handle(*outcomes)
    return Ingress(handle, ServiceConfig(bundle="unused", retry=RetryPolicy(attempts=2, backoff_s=0.01))), handle


def test_ingress_answers_200_after_its_replica_died():
    from ray.exceptions import ActorDiedError

    ingress, handle = _ingress(ActorDiedError(), (0.0, (200, b"png bytes", {"x-mordasr-replica": "b"})))
    response = _run(ingress(_request(b"\x89PNG...")))
    assert response.status_code == 200 and response.body == b"png bytes"
    assert response.headers["x-mordasr-attempts"] == "2" and len(handle.made) == 2
    assert ingress.pending() == 0


def test_ingress_answers_503_with_retry_after_when_no_replica_lives_or_the_queue_is_full():
    import json

    from ray.exceptions import ActorUnavailableError
    from ray.serve.exceptions import BackPressureError

    ingress, _ = _ingress(ActorUnavailableError("gone", None), ActorUnavailableError("gone", None))
    response = _run(ingress(_request(b"x", {"x-request-id": "r1"})))
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert response.headers["x-mordasr-attempts"] == "2" and json.loads(response.body)["request_id"] == "r1"
    ingress, handle = _ingress(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    response = _run(ingress(_request(b"x")))
    assert response.status_code == 503 and response.headers["retry-after"] == "2" and len(handle.made) == 1
    assert b"queue is full" in response.body


def test_healthz_answers_from_the_ingress_when_every_replica_is_busy(monkeypatch):
    """A probe must not wait behind a long restore: past HEALTH_TIMEOUT_S the ingress answers
    alone, with its own in-flight count."""
    import json

    from starlette.requests import Request

    from mordasr.serving import app

    monkeypatch.setattr(app, "HEALTH_TIMEOUT_S", 0.05)
    ingress, _ = _ingress((5.0, {"status": "ok"}), {"status": "ok", "replica": "a"})
    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [], "query_string": b"", "root_path": ""}
    started = asyncio.run(asyncio.wait_for(ingress(Request(scope)), 2))
    answer = json.loads(started.body)
    assert started.status_code == 200 and answer["status"] == "busy" and answer["in_flight"] == 0
    answer = json.loads(_run(ingress(Request(scope))).body)
    assert answer["status"] == "ok" and answer["replica"] == "a"


def test_ingress_passes_a_bad_image_through_and_refuses_once_draining():
    ingress, handle = _ingress((0.0, (422, {"error": "cannot decode", "status": 422}, {})))
    response = _run(ingress(_request(b"x")))
    assert response.status_code == 422 and response.headers["x-mordasr-attempts"] == "1"
    response = _run(ingress(_request(b"x", {"x-mordasr-deadline-s": "soon"})))
    assert response.status_code == 400 and len(handle.made) == 1  # refused before any replica saw it
    assert ingress.drain() == 0
    response = _run(ingress(_request(b"x")))
    assert response.status_code == 503 and response.headers["connection"] == "close" and len(handle.made) == 1


def _png(side: int, seed: int = 0) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _post(url: str, data: bytes) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status, {name.lower(): value for name, value in response.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, {name.lower(): value for name, value in err.headers.items()}
    except OSError:
        return -1, {}


@pytest.mark.slow
def test_a_burst_past_the_queue_gets_503_and_sigterm_drains_then_exits_0(folded_bundle, tmp_path):
    """One replica running one request and queueing one more: of a burst of 10, the overflow is
    answered 503 with Retry-After at once, the rest 200. Then SIGTERM with a large request in
    flight: that request is answered 200, and the process exits 0 within the grace period."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    pytest.importorskip("ray.serve", reason="needs Ray Serve (pip install 'mordasr[serve]')")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = tmp_path / "url"
    exe = Path(sys.executable).with_name("mordasr-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mordasr.serving.cli"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd + ["--bundle", str(folded_bundle), "--port", str(port), "--replicas", "1",
                                   "--threads", "1", "--max-batch-size", "1", "--batch-wait-ms", "0",
                                   "--max-queued-per-replica", "1", "--grace", "60", "--ready-file", str(ready)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.time() + 240
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        url = ready.read_text().strip()
        assert _post(url, _png(16))[0] == 200  # sessions loaded before the burst
        with ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(lambda i: _post(url, _png(96, i)), range(10)))
        statuses = sorted(status for status, _ in answers)
        assert set(statuses) == {200, 503} and statuses.count(200) >= 2, statuses
        assert all(headers.get("retry-after") == "2" for status, headers in answers if status == 503)

        in_flight: list = []
        thread = threading.Thread(target=lambda: in_flight.append(_post(url, _png(320, 9))))
        thread.start()
        deadline = time.time() + 60
        while True:  # until the ingress holds the request; /healthz answers while the replica is busy
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=10) as response:
                if json.loads(response.read())["in_flight"] >= 1:
                    break
            assert not in_flight and time.time() < deadline, in_flight
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
        stopped_after = time.monotonic() - signalled
        thread.join(timeout=30)
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert in_flight and in_flight[0][0] == 200, in_flight
        assert stopped_after < 60 + 30  # the grace period, and Ray's own shutdown
        assert "refusing new requests" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
