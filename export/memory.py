"""Memory budget: what a bundle needs at run time, estimated from its ONNX graphs before anything
is built or loaded.

Per graph: weight bytes (initializers and Constant nodes, external data included, read from the
tensor headers only) and peak activation bytes at a given output size: shape inference with the
profile's concrete input shapes, then a liveness walk over the nodes in order (a tensor lives from
the node that makes it to the last node that reads it). For a mode and bucket count, the graphs
held at once are summed: per-bucket graphs, one refitted graph plus a weight pack, or the
``max_engines`` largest (the worst case of the runtime's LRU).

What a runtime adds to that differs by backend (``RuntimeCosts``). TensorRT gives every execution
context its own activation memory, so activations add up over held graphs. The runtime's ONNX
Runtime CPU backend shares one arena among its sessions, which run one after another, so the
largest graph's activations are the peak; but that arena holds about twice the liveness peak
(convolutions run in a blocked NCHWc layout through reorder copies the ONNX graph does not show,
and regions sized for earlier, smaller tensors are not reused by later, larger ones), and loading
onnxruntime itself costs a fixed amount. Those two figures are measured, not derived: see
``ONNXRUNTIME_CPU``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mordasr.errors import MordasrError
from mordasr.runtime.manifest import GraphSpec, Manifest
from mordasr.runtime.trt_settings import profile_shapes

MIB = 1 << 20


@dataclass(frozen=True)
class RuntimeCosts:
    """What a backend holds beyond the graphs' weights and their liveness peaks."""

    name: str
    shared_arena: bool  # sessions run one after another from one arena: the largest graph's activations
    arena_factor: float  # resident bytes per byte of that liveness peak
    base: int  # the runtime itself, loaded once per process
    per_graph: int  # each loaded graph (session or execution context)


# Not measurable here (no TensorRT on this project's machines): activations as the liveness walk
# counts them, one context each, and a fixed 12 MiB per engine; the device profiles' memory
# fraction leaves room for the CUDA context and TensorRT's libraries.
TENSORRT = RuntimeCosts("tensorrt", shared_arena=False, arena_factor=1.0, base=0, per_graph=12 * MIB)
# Fitted on 16 fresh-process peaks (VmHWM rise from before the runtime loads onnxruntime): the
# tiny folded, gated and dense-LoRA bundles and a 4-bucket folded one, 4 to 10 graphs, 256-640 px
# outputs, every graph run once. The rise grew 1.84-2.10 MiB per MiB of the largest graph's
# liveness peak, and a least-squares intercept left about 50 MiB for onnxruntime and almost
# nothing per session; with these figures every point was within 7.5 % (tests/test_edge_readiness.py).
ONNXRUNTIME_CPU = RuntimeCosts("onnxruntime-cpu", shared_arena=True, arena_factor=2.0, base=50 * MIB,
                               per_graph=1 * MIB)
BACKENDS = {c.name: c for c in (TENSORRT, ONNXRUNTIME_CPU)}
# Elementwise and view ops whose output can take the buffer of an input that dies at that node
# (ONNX Runtime's planner reuses it; TensorRT fuses most of them away).
IN_PLACE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Relu", "LeakyRelu", "Sigmoid",
                "Tanh", "Erf", "Gelu", "Clip", "Softmax", "Cast", "Identity", "Reshape", "Flatten",
                "Squeeze", "Unsqueeze"}


def _tensor_bytes(elem_type: int, dims) -> int | None:
    if any(not isinstance(d, int) or d < 0 for d in dims):
        return None
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    return int(np.prod(dims, dtype=np.int64)) * itemsize


def _initializer_bytes(tensor: TensorProto) -> int:
    return _tensor_bytes(tensor.data_type, list(tensor.dims)) or 0


def _infer_shapes(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference sizes the Reshape/Expand chains that onnx's own
    leaves unknown (measured on the tiny UNet: 0 of 582 tensors unsized vs 499 of 687)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # missing sympy, or an op it does not know: fall back to onnx's inference
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # onnx raises its own error types
        raise MordasrError(f"{name}: shape inference failed ({err})") from None


@dataclass
class GraphMemory:
    key: str
    weights: int  # bytes
    activations: int  # peak bytes of live intermediate tensors, inputs and outputs included
    unsized: int = 0  # tensors shape inference could not size (counted as 0 bytes)

    @property
    def total(self) -> int:
        return self.weights + self.activations


def graph_memory(path: str | Path, input_shapes: dict[str, list[int]], key: str = "") -> GraphMemory:
    """Weights and peak activations of one graph for concrete ``input_shapes``."""
    model = onnx.load(str(path), load_external_data=False)
    weights = sum(_initializer_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            weights += sum(_initializer_bytes(a.t) for a in node.attribute if a.name == "value")
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    inferred = _infer_shapes(model, Path(path).name)
    sizes: dict[str, int | None] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        sizes[value.name] = _tensor_bytes(t.elem_type, dims) if t.HasField("shape") else None
    constant = {i.name for i in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in model.graph.output}
    live = {i.name for i in model.graph.input if i.name not in constant}
    unsized = set()

    def size_of(name: str) -> int:
        size = sizes.get(name)
        if size is None:
            unsized.add(name)
            return 0
        return size

    current = sum(size_of(n) for n in live)
    peak = current
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Constant":
            continue
        dying = [n for n in node.input if n in live and n not in outputs and last_use.get(n) == i]
        for name in node.output:
            if name and name not in live:
                live.add(name)
                size = size_of(name)
                reuse = next((n for n in dying if node.op_type in IN_PLACE_OPS and size_of(n) == size), None)
                if reuse is not None:  # takes the dying input's buffer: no new bytes
                    dying.remove(reuse)
                    live.discard(reuse)
                    current -= size
                current += size
        peak = max(peak, current)
        for name in set(node.input) | set(node.output):
            if name in live and name not in outputs and last_use.get(name, -1) <= i:
                live.discard(name)
                current -= size_of(name)
    return GraphMemory(key or Path(path).stem, int(weights), int(peak), len(unsized))


@dataclass
class MemoryEstimate:
    output_size: tuple[int, int]  # (h, w) pixels the activations were sized for
    mode: str
    bucket_switch: str
    graphs: dict[str, GraphMemory]
    held: list[str]  # graph keys held at once
    pack_bytes: int = 0  # refit: the largest weight pack per component, held on the host
    notes: list[str] = field(default_factory=list)
    runtime: RuntimeCosts = TENSORRT

    @property
    def weights(self) -> int:
        return sum(self.graphs[k].weights for k in self.held)

    @property
    def activations(self) -> int:
        per_graph = [self.graphs[k].activations for k in self.held]
        peak = max(per_graph, default=0) if self.runtime.shared_arena else sum(per_graph)
        return int(peak * self.runtime.arena_factor)

    @property
    def overhead(self) -> int:
        return self.runtime.base + self.runtime.per_graph * len(self.held)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.pack_bytes + self.overhead

    def to_dict(self) -> dict:
        return {"output_size": list(self.output_size), "mode": self.mode, "bucket_switch": self.bucket_switch,
                "weights_mib": round(self.weights / MIB, 1), "activations_mib": round(self.activations / MIB, 1),
                "packs_mib": round(self.pack_bytes / MIB, 1), "runtime": self.runtime.name,
                "overhead_mib": round(self.overhead / MIB, 1), "total_mib": round(self.total / MIB, 1),
                "held": self.held,
                "per_graph_mib": {k: {"weights": round(g.weights / MIB, 2),
                                      "activations": round(g.activations / MIB, 2)}
                                  for k, g in self.graphs.items()}}

    def table(self) -> str:
        h, w = self.output_size
        lines = [f"memory estimate at {w}x{h} output ({self.mode}, bucket switch {self.bucket_switch}, "
                 f"{self.runtime.name}):",
                 f"  {'graph':<12} {'weights MiB':>12} {'activations MiB':>16}  held"]
        for key, g in self.graphs.items():
            lines.append(f"  {key:<12} {g.weights / MIB:>12.1f} {g.activations / MIB:>16.1f}  "
                         f"{'yes' if key in self.held else 'no'}")
        if self.pack_bytes:
            lines.append(f"  {'packs':<12} {self.pack_bytes / MIB:>12.1f} {'':>16}  host copy for refit")
        lines.append(f"  total {self.total / MIB:.1f} MiB (weights {self.weights / MIB:.1f}, activations "
                     f"{self.activations / MIB:.1f}, runtime and {len(self.held)} graphs' overhead "
                     f"{self.overhead / MIB:.0f})")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def estimate_bundle(bundle_dir: str | Path, manifest: Manifest, output_size: str | int | tuple[int, int],
                    bucket_switch: str = "graphs", max_engines: int | None = None,
                    runtime: str = "tensorrt") -> MemoryEstimate:
    """What ``manifest``'s bundle holds at once when restoring ``output_size`` pixels (h, w) on
    ``runtime`` (a key of ``BACKENDS``: ``tensorrt`` or ``onnxruntime-cpu``)."""
    from mordasr.runtime.trt_settings import parse_size

    if runtime not in BACKENDS:
        raise ValueError(f"unknown runtime {runtime!r} (one of {', '.join(BACKENDS)})")
    costs = BACKENDS[runtime]
    bundle_dir = Path(bundle_dir)
    text = f"{output_size[1]}x{output_size[0]}" if isinstance(output_size, tuple) else output_size
    hw = parse_size(text)
    size = f"{hw[1]}x{hw[0]}"
    primary = manifest.primary_graphs
    graphs = {}
    for g in primary:
        shapes = {name: s[2] for name, s in profile_shapes(manifest, g, size, size, size).items()}
        graphs[g.key] = graph_memory(bundle_dir / g.file, shapes, g.key)
    refit = bucket_switch == "refit" and manifest.mode == "folded" and bool(manifest.weight_packs)
    held_graphs: list[GraphSpec] = [g for g in primary if not (refit and g.bucket not in (None, 0)
                                                               and manifest.weight_pack(g.component, g.bucket))]
    notes = []
    if max_engines is not None and len(held_graphs) > max_engines:
        held_graphs = sorted(held_graphs, key=lambda g: graphs[g.key].total, reverse=True)[:max_engines]
        notes.append(f"at most {max_engines} graphs held (the largest counted: the LRU's worst case)")
    pack_bytes = 0
    if refit:
        for component in {p.component for p in manifest.weight_packs}:
            pack_bytes += max(p.bytes for p in manifest.weight_packs if p.component == component)
        notes.append("folded buckets reached by refitting bucket 0's graphs from weight packs")
    if costs.arena_factor != 1.0:
        notes.append(f"{costs.name}: activations are the largest graph's liveness peak x{costs.arena_factor:g}, "
                     "what its shared arena was measured to hold")
    unsized = sum(g.unsized for g in graphs.values())
    if unsized:
        notes.append(f"{unsized} tensors could not be sized by shape inference and count as 0 bytes")
    held = [g.key for g in primary if g in held_graphs]
    return MemoryEstimate(hw, manifest.mode, "refit" if refit else "graphs", graphs, held, pack_bytes, notes,
                          costs)


def check_budget(estimate: MemoryEstimate, budget_bytes: int, device: str) -> None:
    """Refuse, with the number and the limit, a bundle the device cannot hold."""
    if estimate.total > budget_bytes:
        h, w = estimate.output_size
        raise MordasrError(f"the bundle needs {estimate.total / MIB:.0f} MiB at {w}x{h} output "
                           f"({estimate.mode}, bucket switch {estimate.bucket_switch}), more than the "
                           f"{budget_bytes / MIB:.0f} MiB device profile {device} allows; lower --max-size, "
                           "use fewer --buckets, or a mode that holds less (gated, or folded with refit)")
