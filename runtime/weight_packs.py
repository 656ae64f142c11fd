"""Read a folded bundle's weight packs (safetensors through numpy: no torch) and switch a
component's weights between buckets with them (``switch_bucket``, shared by every backend)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mordasr.errors import BundleError
from mordasr.lazy import import_optional
from mordasr.runtime.manifest import Manifest, WeightPack


def load_weight_pack(bundle_dir: str | Path, pack: WeightPack) -> dict[str, np.ndarray]:
    """The pack's tensors by ONNX initializer (= TensorRT refit weight) name."""
    load_file = import_optional("safetensors.numpy", "switching buckets by refit").load_file
    path = Path(bundle_dir) / pack.file
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise BundleError(f"cannot read weight pack {pack.file} ({err}); re-export the bundle") from None
    if len(tensors) != pack.tensors:
        raise BundleError(f"weight pack {pack.file} holds {len(tensors)} tensors, the manifest says "
                          f"{pack.tensors}; re-export the bundle")
    return tensors


def pack_loader(bundle_dir: str | Path, manifest: Manifest, component: str) -> Callable[[int], dict[str, np.ndarray]]:
    """bucket -> that bucket's pack tensors for ``component`` (for ``switch_bucket``)."""
    def load(bucket: int) -> dict[str, np.ndarray]:
        pack = manifest.weight_pack(component, bucket)
        if pack is None:
            raise BundleError(f"no weight pack for {component} bucket {bucket}; re-export the bundle")
        return load_weight_pack(bundle_dir, pack)

    return load


class BucketWeights(Protocol):
    """Where one component's refittable weights live: a TensorRT engine, an ONNX Runtime session."""

    def write(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite the named weights with these values (full tensors)."""


@dataclass
class BucketSlot:
    """A component's weights and the bucket they currently hold (None: unknown)."""

    target: BucketWeights
    bucket: int | None = None


def switch_bucket(slot: BucketSlot, bucket: int, pack_tensors: Callable[[int], dict[str, np.ndarray]]) -> bool:
    """Make ``slot`` hold ``bucket``'s weights; every backend switches buckets through here.

    The pack holds the bucket's full tensors for every weight that differs between buckets, so
    writing it replaces whatever the previous bucket left (A -> B -> A gives A exactly, and no
    tensor of A survives in B). The slot is marked unknown before the write: TensorRT documents
    that a failed ``refit_cuda_engine`` may have refitted a subset of the weights, so a failure
    must not leave the old bucket's label on mixed weights. Returns whether anything was written.
    """
    if slot.bucket == bucket:
        return False
    slot.bucket = None
    slot.target.write(pack_tensors(bucket))
    slot.bucket = bucket
    return True
