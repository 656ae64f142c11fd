"""Engine cache: TensorRT plans kept outside the bundle, keyed by everything a plan depends on.

A plan runs only on the GPU compute capability and TensorRT version it was built with, and only
does what its bundle's graphs did at the precision and shape profile it was built for. The key
holds all five (plus refittability), so a changed bundle, a JetPack upgrade or another GPU is a
miss, never a wrong engine. A miss is rebuilt where TensorRT imports; elsewhere the caller gets
one line with the bundle's build command for that graph. The timing cache is kept per device (compute capability and
TensorRT version) and shared by every bundle built there. No TensorRT import in this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mordasr.errors import BundleError
from mordasr.runtime.atomic import atomic_write
from mordasr.runtime.cache_dirs import user_cache_dir
from mordasr.runtime.engine_names import TensorRTVersion, compute_capability_tag
from mordasr.runtime.manifest import sha256_file

CACHE_ENV = "MORDASR_ENGINE_CACHE"
INDEX = "index.json"
LOCK = "index.lock"


def default_cache_dir() -> Path:
    return user_cache_dir(CACHE_ENV, "engines")


@dataclass(frozen=True)
class EngineKey:
    graph: str  # GraphSpec.key
    compute_capability: str
    tensorrt_version: str
    precision: str
    profile: tuple  # ((input name, (min, opt, max) shapes), ...)
    manifest_hash: str  # Manifest.content_hash()
    refittable: bool = False

    @classmethod
    def make(cls, graph: str, cc: str, version: str, precision: str, profile: dict, manifest_hash: str,
             refittable: bool = False) -> "EngineKey":
        frozen = tuple(sorted((name, tuple(tuple(s) for s in shapes)) for name, shapes in profile.items()))
        return cls(graph, cc, str(TensorRTVersion.parse(version)), precision, frozen, manifest_hash, refittable)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def file_name(self) -> str:
        tag = compute_capability_tag(self.compute_capability)
        return f"{self.graph}.{tag}.trt{self.tensorrt_version}.{self.precision}.{self.digest}.plan"

    def differences(self, other: "EngineKey") -> list[str]:
        """What makes ``other`` (a cached engine of the same graph) unusable for this key."""
        labels = {"compute_capability": "compute capability", "tensorrt_version": "TensorRT version",
                  "precision": "precision", "profile": "shape profile", "manifest_hash": "bundle contents",
                  "refittable": "refittability"}
        return [f"{label} {getattr(other, f)} (wanted {getattr(self, f)})" if f not in ("profile", "manifest_hash")
                else f"{label} differ"
                for f, label in labels.items() if getattr(self, f) != getattr(other, f)]


class EngineCache:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def _index(self) -> list[dict]:
        path = self.root / INDEX
        if not path.is_file():
            return []
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return []  # a damaged index only costs rebuilds

    def _write_index(self, entries: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / INDEX, json.dumps(entries, indent=1) + "\n")

    def lookup(self, key: EngineKey) -> Path | None:
        for entry in self._index():
            if entry["digest"] == key.digest:
                path = self.root / entry["file"]
                if path.is_file() and sha256_file(path) == entry["sha256"]:
                    return path
        return None

    def why_missed(self, key: EngineKey) -> str:
        """One line on the nearest cached engine of the same graph, or that there is none."""
        same_graph = [e for e in self._index() if e["key"]["graph"] == key.graph]
        if not same_graph:
            return f"no cached engine for {key.graph}"
        other = same_graph[-1]["key"]
        other_key = EngineKey(**{**other, "profile": tuple((n, tuple(tuple(s) for s in shapes))
                                                           for n, shapes in other["profile"])})
        return f"the cached engine for {key.graph} differs: " + "; ".join(key.differences(other_key))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the index's lock: processes building different graphs into one cache each read,
        extend and rewrite the index in turn, so none loses another's entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def store(self, key: EngineKey, plan: bytes, build_seconds: float) -> Path:
        path = atomic_write(self.root / key.file_name, plan)
        entry = {"digest": key.digest, "file": key.file_name, "sha256": sha256_file(path),
                 "key": asdict(key), "build_seconds": round(build_seconds, 2),
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with self._locked():
            self._write_index([e for e in self._index() if e["digest"] != key.digest] + [entry])
        return path

    def entry(self, key: EngineKey) -> dict | None:
        return next((e for e in self._index() if e["digest"] == key.digest), None)

    def timing_cache(self, cc: str, version: str) -> Path:
        """One timing cache per device (GPU and TensorRT version), shared across bundles."""
        tag = compute_capability_tag(cc)
        return self.root / "timing" / f"{tag}.trt{TensorRTVersion.parse(version)}.cache"


def resolve_engine(cache: EngineCache, key: EngineKey, build: Callable[[], bytes] | None,
                   build_hint: str) -> Path:
    """The cached plan for ``key``; on a miss, ``build()`` it and cache it, or, where nothing can
    build (``build`` is None: TensorRT does not import), raise with the build command."""
    hit = cache.lookup(key)
    if hit is not None:
        return hit
    reason = cache.why_missed(key)
    if build is None:
        raise BundleError(f"{reason}, and TensorRT does not import here to rebuild it; build it with: "
                          f"{build_hint}")
    start = time.perf_counter()
    plan = build()
    return cache.store(key, plan, time.perf_counter() - start)


def build_hint(bundle_dir: str | Path, graph_file: str) -> str:
    """The bundle's ``build_engines.sh`` line for one graph (its exact build), or the script."""
    script = Path(bundle_dir) / "build_engines.sh"
    if script.is_file():
        for line in script.read_text().splitlines():
            if line.startswith("build ") and (f"build {graph_file} " in line or f"build '{graph_file}' " in line):
                return f"bash {script} (this graph: {line})"
    return f"bash {script}" if script.is_file() else "mordasr-export --engines on a machine with TensorRT"
