"""Read a folded bundle's weight packs (safetensors through numpy: no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime.manifest import WeightPack


def load_weight_pack(bundle_dir: str | Path, pack: WeightPack) -> dict[str, np.ndarray]:
    """The pack's tensors by ONNX initializer (= TensorRT refit weight) name."""
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise MordasrError("switching buckets by refit needs safetensors: pip install safetensors") from None
    path = Path(bundle_dir) / pack.file
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise BundleError(f"cannot read weight pack {pack.file} ({err}); re-export the bundle") from None
    if len(tensors) != pack.tensors:
        raise BundleError(f"weight pack {pack.file} holds {len(tensors)} tensors, the manifest says "
                          f"{pack.tensors}; re-export the bundle")
    return tensors
