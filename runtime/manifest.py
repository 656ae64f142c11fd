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
from mordasr.records import RecordError, from_dict
from mordasr.runtime.atomic import atomic_write

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # schema 2 added hybrid/dense-lora modes, weight packs, engines
MANIFEST_NAME = "manifest.json"
# folded: per-bucket graphs with routing merged; gated: one graph set fed the scores;
# hybrid: shared ranks merged, routed ranks gated; dense-lora: the merged LoRA baseline;
# adaptir: the UNet keeps its AdaptIR branches (fused, spectral transforms as matrix products).
MODES = ("folded", "gated", "hybrid", "dense-lora", "adaptir")
SCORE_FED_MODES = ("gated", "hybrid")
PRECISIONS = ("fp32", "fp16", "int8", "mixed")  # mixed: components differ (graphs say which)
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
    external_data: str | None = None  # weights file next to graphs past protobuf's 2 GB limit
    external_sha256: str | None = None
    fallback: bool = False  # the FP32 graph rerun when the reduced-precision one is not finite

    @property
    def key(self) -> str:
        key = self.component if self.bucket is None else f"{self.component}.b{self.bucket}"
        return f"{key}.fallback" if self.fallback else key


@dataclass
class WeightPack:
    """A folded bucket's differing tensors (safetensors), applied over ``base_graph``."""

    component: str
    bucket: int
    file: str
    sha256: str
    base_graph: str  # the bucket-0 graph file the pack's names refer to
    tensors: int
    bytes: int


@dataclass
class EngineSpec:
    """A TensorRT engine built from one graph for one GPU and TensorRT version."""

    graph: str  # GraphSpec.key
    file: str
    sha256: str
    compute_capability: str  # e.g. "8.7"
    tensorrt_version: str  # e.g. "10.3.0"
    precision: str
    profile: dict[str, list[list[int]]]  # input name -> [min, opt, max] shapes
    refittable: bool = False
    build_seconds: float = 0.0


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
    weight_packs: list[WeightPack] = field(default_factory=list)
    engines: list[EngineSpec] = field(default_factory=list)
    latent_downsample: int = 8  # image pixels per latent pixel (for shape profiles)
    profile: dict[str, list[int]] = field(default_factory=dict)  # output [h, w] px: min/opt/max
    # Images per graph call the runtime sends at most (it splits larger batches); the engines'
    # profiles take that many (the router that many times its windows per image).
    max_batch: int = 1
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineOptions the exporter used
    device: dict[str, Any] = field(default_factory=dict)  # the device profile exported for, if any
    memory: dict[str, Any] = field(default_factory=dict)  # the exporter's memory estimate at max size
    schema_version: int = SCHEMA_VERSION
    mordasr_version: str = ""

    def graph(self, component: str, bucket: int | None = None) -> GraphSpec:
        want_bucket = bucket if self.mode == "folded" and component in ("encoder", "unet") else None
        for g in self.graphs:
            if g.component == component and g.bucket == want_bucket and not g.fallback:
                return g
        raise BundleError(f"bundle has no {component} graph"
                          + (f" for bucket {bucket}" if want_bucket is not None else ""))

    def fallback_graph(self, graph: GraphSpec) -> GraphSpec | None:
        """The FP32 graph kept for ``graph``'s component and bucket, if the bundle ships one."""
        for g in self.graphs:
            if g.fallback and g.component == graph.component and g.bucket == graph.bucket:
                return g
        return None

    @property
    def primary_graphs(self) -> list[GraphSpec]:
        return [g for g in self.graphs if not g.fallback]

    def component_precision(self, component: str) -> str:
        return next((g.precision for g in self.primary_graphs if g.component == component), self.precision)

    def content_hash(self) -> str:
        """sha256 of what the bundle computes (graphs, packs, buckets, scheduler), not of the engines
        built from it: the engine cache key."""
        data = self.to_dict()
        for volatile in ("engines", "memory", "source", "mordasr_version", "engine_options"):
            data.pop(volatile, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def weight_pack(self, component: str, bucket: int) -> WeightPack | None:
        for p in self.weight_packs:
            if p.component == component and p.bucket == bucket:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, bundle_dir: str | Path) -> Path:
        """Write ``manifest.json`` atomically (temp file + rename): a reader never sees half."""
        return atomic_write(Path(bundle_dir) / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        # schema 1 lacks only fields that have defaults
        return from_dict(cls, {**data, "schema_version": SCHEMA_VERSION}, where)


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
    if version not in READABLE_SCHEMAS:
        raise BundleError(f"{path}: manifest schema {version!r}, this runtime reads schema "
                          f"{SCHEMA_VERSION}; re-export the bundle with this mordasr version")
    try:
        manifest = Manifest.from_dict(data, str(path))
    except RecordError as err:
        raise BundleError(f"malformed manifest: {err}; re-export the bundle") from None
    if manifest.mode not in MODES:
        raise BundleError(f"{path}: unknown export mode {manifest.mode!r}")
    if manifest.precision not in PRECISIONS:
        raise BundleError(f"{path}: unknown precision {manifest.precision!r}")
    if not isinstance(manifest.max_batch, int) or manifest.max_batch < 1:
        raise BundleError(f"{path}: max_batch must be a positive integer, not {manifest.max_batch!r}")
    if verify_hashes:
        checked = [(g.file, g.sha256) for g in manifest.graphs]
        checked += [(g.external_data, g.external_sha256) for g in manifest.graphs if g.external_data]
        checked += [(p.file, p.sha256) for p in manifest.weight_packs]
        for name, digest in checked:
            verify_file(bundle_dir, name, digest)
    return manifest


def verify_file(bundle_dir: Path, name: str, digest: str) -> None:
    file = bundle_dir / name
    if not file.is_file():
        raise BundleError(f"bundle file {name} is missing; re-export the bundle")
    if sha256_file(file) != digest:
        raise BundleError(f"bundle file {name} does not match its sha256 in the manifest "
                          "(modified or corrupted); re-export the bundle")
