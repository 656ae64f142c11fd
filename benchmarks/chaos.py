"""``mordasr-bench-serve --chaos``: a fixed load with bad inputs mixed in, and a replica killed
(SIGKILL) in the middle of it.

Clients send the requests one after another (each client waits for its answer), one request in
``bad_every`` a corrupt PNG. After ``kill_after_s`` one restorer replica's process is killed; Ray
Serve replaces it while the ingress retries the requests it took down. The report counts, per
kind of request and status code: sent, answered, retried (more than one attempt), lost (no
answer, or a 500), and gives p50/p95/p99 latency and throughput before the kill, while the
deployment is short of a replica, and after it is whole again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"not an image" * 8


def _post(url: str, data: bytes) -> tuple[int, int, float, float]:
    """(status, attempts, sent at, seconds); status -1 when the connection failed."""
    sent = time.monotonic()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/png"})
    attempts = 0
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            status, attempts = response.status, int(response.headers.get("x-mordasr-attempts", "0") or 0)
    except urllib.error.HTTPError as err:
        status, attempts = err.code, int(err.headers.get("x-mordasr-attempts", "0") or 0)
    except OSError:
        status = -1
    return status, attempts, sent, time.monotonic() - sent


def _health(url: str) -> dict:
    import json

    with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=30) as response:
        return json.loads(response.read())


def _healthy_replicas() -> int:
    from ray import serve

    status = serve.status().applications["mordasr"].deployments["restorer"]
    return int(status.replica_states.get("RUNNING", 0))


def chaos_load(url: str, good: list[bytes], requests: int, clients: int, bad_every: int, kill_after_s: float,
               replicas: int, progress=print) -> dict:
    """Send ``requests`` requests from ``clients`` clients; kill one replica after ``kill_after_s``."""
    payloads = [(CORRUPT_PNG, "bad") if i % bad_every == bad_every - 1 else (good[i % len(good)], "good")
                for i in range(requests)]
    events: dict[str, float] = {}

    def kill() -> None:
        time.sleep(kill_after_s)
        pid = _health(url)["pid"]
        events["killed"] = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        progress(f"killed replica process {pid}")
        time.sleep(1.0)  # the controller notices the death, then starts a replacement
        while _healthy_replicas() < replicas:
            time.sleep(0.2)
        events["whole"] = time.monotonic()
        progress(f"whole again after {events['whole'] - events['killed']:.1f} s")

    killer = threading.Thread(target=kill, daemon=True)
    start = time.monotonic()
    killer.start()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda item: (item[1], *_post(url, item[0])), payloads))
    end = time.monotonic()
    killer.join(timeout=120)
    return summarize(answers, start, end, events)


def summarize(answers: list[tuple[str, int, int, float, float]], start: float, end: float,
              events: dict[str, float]) -> dict:
    """Counts per kind and status, and latency/throughput per phase, from (kind, status, attempts,
    sent at, seconds) rows."""
    killed, whole = events.get("killed", end), events.get("whole", end)
    counts: dict[str, dict] = {}
    for kind in ("good", "bad"):
        rows = [a for a in answers if a[0] == kind]
        statuses = Counter(a[1] for a in rows)
        lost = sum(n for status, n in statuses.items() if status in (-1, 500))
        counts[kind] = {"sent": len(rows), "answered": sum(n for s, n in statuses.items() if s != -1),
                        "retried": sum(1 for a in rows if a[2] > 1), "lost": lost,
                        "by_status": {str(s): n for s, n in sorted(statuses.items())}}
    phases = {}
    for name, lo, hi in (("before the kill", start, killed), ("short of a replica", killed, whole),
                         ("after recovery", whole, end)):
        done = [a for a in answers if a[0] == "good" and a[1] == 200 and lo <= a[3] + a[4] < hi]
        seconds = max(hi - lo, 1e-9)
        latency = np.array([a[4] for a in done]) * 1e3
        phases[name] = {"seconds": hi - lo, "requests_ok": len(done), "requests_per_s": len(done) / seconds,
                        **({f"p{q}_ms": float(np.percentile(latency, q)) for q in (50, 95, 99)}
                           if latency.size else {})}
    return {"counts": counts, "phases": phases, "seconds": end - start,
            "recovery_s": (whole - killed) if "whole" in events else None}


def chaos_report(results: dict) -> list[str]:
    lines = [f"# Chaos: {results['replicas']} replicas, one killed after {results['kill_after_s']:g} s", "",
             f"{results['requests']} requests of {results['lr_size']}x{results['lr_size']} px from "
             f"{results['clients']} clients (each waits for its answer), one in {results['bad_every']} a corrupt "
             f"PNG; the ingress tries a request whose replica died up to {results['attempts']} times. "
             f"Machine: {results['machine'].get('cpu', '?')}, {results['machine'].get('cores', '?')} cores.", "",
             "| requests | sent | answered | retried | lost | by status |", "|---|---:|---:|---:|---:|---|"]
    for kind, c in results["counts"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in c["by_status"].items())
        lines.append(f"| {kind} | {c['sent']} | {c['answered']} | {c['retried']} | {c['lost']} | {statuses} |")
    lines += ["", "| phase | seconds | good answered 200 | requests/s | p50 ms | p95 ms | p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in results["phases"].items():
        lines.append(f"| {name} | {p['seconds']:.1f} | {p['requests_ok']} | {p['requests_per_s']:.2f} | "
                     f"{p.get('p50_ms', float('nan')):.0f} | {p.get('p95_ms', float('nan')):.0f} | "
                     f"{p.get('p99_ms', float('nan')):.0f} |")
    recovery = results.get("recovery_s")
    lines += ["", "Lost: no answer, or a 500. A phase's requests are those that finished in it; 'short of a "
              "replica' runs from the kill until Ray Serve reports every replica running again"
              + (f" ({recovery:.1f} s)." if recovery is not None else " (it did not recover during the load).")]
    return lines
