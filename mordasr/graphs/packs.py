"""Weight packs: per bucket, only the tensors that differ between a folded bundle's buckets.

Folded buckets share one architecture and differ only in the weights MoR touches. A pack holds,
for one bucket, the full values (never a delta: switching A -> B -> A must give A exactly) of
every initializer that is not the same in all buckets, keyed by its ONNX initializer name.
TensorRT's ONNX parser names refittable weights after the ONNX initializers, so the same names
address an engine's weights; nothing here depends on PyTorch module names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mordasr.errors import MordasrError
from mordasr.runtime.manifest import GraphSpec, WeightPack, sha256_file

PACK_DIR = "packs"


def _structure(model: onnx.ModelProto) -> tuple:
    nodes = tuple((n.op_type, tuple(n.input), tuple(n.output)) for n in model.graph.node)
    inits = tuple((i.name, i.data_type, tuple(i.dims)) for i in model.graph.initializer)
    return nodes, inits


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def differing_tensors(models: Sequence[onnx.ModelProto]) -> list[str]:
    """Initializer names whose values are not identical in every graph.

    The graphs must have the same nodes and initializer names/shapes (bucket graphs of one
    architecture do); otherwise a pack could not be applied and ``MordasrError`` says so.
    """
    if len(models) < 2:
        return []
    reference = _structure(models[0])
    for m in models[1:]:
        if _structure(m) != reference:
            raise MordasrError("bucket graphs differ in structure, not only in weights; "
                               "weight packs need graphs of one architecture")
    first = initializers(models[0])
    changed = set()
    for m in models[1:]:
        for name, value in initializers(m).items():
            if name not in changed and not np.array_equal(value, first[name]):
                changed.add(name)
    return [i.name for i in models[0].graph.initializer if i.name in changed]


def write_weight_packs(bundle_dir: str | Path, graphs: Sequence[GraphSpec]) -> list[WeightPack]:
    """Write one safetensors pack per bucket graph of each folded component; return their specs.

    Each pack applies to the component's bucket-0 graph (the graph a refittable engine is built
    from). Components with one bucket get no packs.
    """
    from safetensors.numpy import save_file

    bundle_dir = Path(bundle_dir)
    packs = []
    components = sorted({g.component for g in graphs if g.bucket is not None})
    for component in components:
        members = sorted((g for g in graphs if g.component == component and g.bucket is not None),
                         key=lambda g: g.bucket)
        if len(members) < 2:
            continue
        models = [onnx.load(str(bundle_dir / g.file)) for g in members]
        names = differing_tensors(models)
        (bundle_dir / PACK_DIR).mkdir(exist_ok=True)
        for graph, model in zip(members, models):
            values = initializers(model)
            file = f"{PACK_DIR}/{component}.b{graph.bucket}.safetensors"
            # copy(order="C"), not ascontiguousarray: the latter turns 0-d INT8 scales into (1,)
            save_file({n: values[n].copy(order="C") for n in names}, str(bundle_dir / file),
                      metadata={"component": component, "bucket": str(graph.bucket),
                                "base_graph": members[0].file, "names": "onnx-initializers"})
            packs.append(WeightPack(component, graph.bucket, file, sha256_file(bundle_dir / file),
                                    members[0].file, len(names),
                                    int(sum(values[n].nbytes for n in names))))
    return packs


def apply_pack(model: onnx.ModelProto, tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
    # The tests' oracle for the packs: bucket 0's graph with bucket k's pack applied must equal
    # bucket k's own graph (the runtime applies packs through its backends instead).
    """A copy of ``model`` with the pack's tensors written over its initializers."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    known = {i.name: i for i in out.graph.initializer}
    missing = sorted(set(tensors) - set(known))
    if missing:
        raise MordasrError(f"weight pack names {len(missing)} tensors the graph lacks, e.g. {missing[0]}")
    for name, value in tensors.items():
        init = known[name]
        if tuple(init.dims) != value.shape:
            raise MordasrError(f"weight pack tensor {name} has shape {value.shape}, graph has {tuple(init.dims)}")
        init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))
    return out
