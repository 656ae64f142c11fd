"""``manifest.json``: the contract between the exporter and the runtime.

It records the schema version, preset, export mode and precision, every graph file with its
sha256, each graph's I/O names, dtypes and shapes (dynamic dims by name), the buckets, the
degradation prompts and temperature, and the scheduler constants. The runtime refuses a bundle
whose schema or hashes do not match, saying what to re-export.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mordasr.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODES = ("folded", "gated")
PRECISIONS = ("fp32", "fp16", "int8")
COMPONENTS = ("router", "encoder", "unet", "decoder")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: list[int | str]  # ints are fixed, strings name dynamic dims


@dataclass
class GraphSpec:
    component: str
    bucket: int | None  # folded per-bucket graphs carry their bucket index
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str = "fp32"  # arithmetic inside the graph; I/O dtypes are in inputs/outputs

    @property
    def key(self) -> str:
        return self.component if self.bucket is None else f"{self.component}.b{self.bucket}"


@dataclass
class Bucket:
    index: int
    label: str
    centre: list[float]


@dataclass
class Manifest:
    preset: str
    adapter: str
    mode: str
    precision: str
    scale: int
    lr_multiple: int  # input height/width must be a multiple of this (the runtime pads)
    router_image_size: int
    degradations: list[dict[str, str]]  # [{"name", "positive", "negative"}]
    temperature: float
    scheduler: dict[str, float]  # timestep, sqrt_alpha_prod, sqrt_one_minus_alpha_prod
    buckets: list[Bucket]
    bucket_rule: str
    graphs: list[GraphSpec]
    random_weights: bool
    source: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)  # how reduced precisions were made
    schema_version: int = SCHEMA_VERSION
    mordasr_version: str = ""

    def graph(self, component: str, bucket: int | None = None) -> GraphSpec:
        want_bucket = bucket if self.mode == "folded" and component in ("encoder", "unet") else None
        for g in self.graphs:
            if g.component == component and g.bucket == want_bucket:
                return g
        raise BundleError(f"bundle has no {component} graph"
                          + (f" for bucket {bucket}" if want_bucket is not None else ""))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, bundle_dir: str | Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        data["buckets"] = [Bucket(**b) for b in data["buckets"]]
        data["graphs"] = [GraphSpec(**{**g, "inputs": [TensorSpec(**t) for t in g["inputs"]],
                                         "outputs": [TensorSpec(**t) for t in g["outputs"]]})
                          for g in data["graphs"]]
        return cls(**data)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check a bundle's manifest; raise ``BundleError`` with what to re-export."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist (export one with mordasr-export)")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a mordasr bundle: no {MANIFEST_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: unreadable manifest ({err}); re-export the bundle") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: manifest schema {version!r}, this runtime reads schema "
                          f"{SCHEMA_VERSION}; re-export the bundle with this mordasr version")
    try:
        manifest = Manifest.from_dict(data)
    except (TypeError, KeyError) as err:
        raise BundleError(f"{path}: malformed manifest ({err}); re-export the bundle") from None
    if manifest.mode not in MODES:
        raise BundleError(f"{path}: unknown export mode {manifest.mode!r}")
    if manifest.precision not in PRECISIONS:
        raise BundleError(f"{path}: unknown precision {manifest.precision!r}")
    if verify_hashes:
        for g in manifest.graphs:
            file = bundle_dir / g.file
            if not file.is_file():
                raise BundleError(f"bundle file {g.file} is missing; re-export the bundle")
            if sha256_file(file) != g.sha256:
                raise BundleError(f"bundle file {g.file} does not match its sha256 in the manifest "
                                  "(modified or corrupted); re-export the bundle")
    return manifest
