"""Check every node of a graph against the ONNX operators TensorRT parses, before any engine build.

The tables (``tensorrt_ops/tensorrt-<major>.json``) come from ONNX-TensorRT's operator matrix; each
file names its source. Besides unsupported operators, the lint rejects what a routed model must
not carry onto an edge engine: data-dependent shapes and control flow (NonZero, If, Loop, ...)
and TopK whose k is not a build-time constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import onnx

from mordasr.errors import MordasrError

TENSORRT_MAJORS = (10, 11)
# Ops TensorRT may parse but that make shapes depend on values or add control flow: a routed
# model exported right never needs them, and edge engines run them poorly.
ROUTING_HAZARDS = {
    "NonZero": "data-dependent output shape",
    "Unique": "data-dependent output shape",
    "Compress": "data-dependent output shape",
    "If": "control flow",
    "Loop": "control flow",
    "Scan": "control flow",
}


@dataclass(frozen=True)
class LintIssue:
    graph: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: node {self.node or '<unnamed>'} ({self.op}): {self.message}"


@cache
def op_table(major: int) -> dict:
    if major not in TENSORRT_MAJORS:
        raise MordasrError(f"no operator table for TensorRT {major}; known: "
                           f"{', '.join(map(str, TENSORRT_MAJORS))}")
    text = resources.files("mordasr.graphs").joinpath(f"tensorrt_ops/tensorrt-{major}.json").read_text()
    return json.loads(text)


# Inputs that set an output's shape (op -> input positions). Where one depends on tensor values
# rather than on shapes and constants, the engine's shapes are only known at run time.
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
                "Range": (0, 1, 2), "Slice": (1, 2, 3, 4), "Resize": (2, 3), "Pad": (1,),
                "Upsample": (1,), "OneHot": (1,), "Squeeze": (1,), "Unsqueeze": (1,)}
# Ops whose output is a shape (or a count) of their input, never its values.
SHAPE_SOURCES = {"Shape", "Size"}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _constants(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _value_dependent(model: onnx.ModelProto) -> set[str]:
    """Tensors whose values depend on the graph inputs' values, not only on their shapes."""
    dependent = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    for node in model.graph.node:  # exported graphs are topologically sorted
        if node.op_type in SHAPE_SOURCES:
            continue
        if any(i in dependent for i in node.input if i):
            dependent.update(o for o in node.output if o)
    return dependent


def lint_model(model: onnx.ModelProto, graph: str, tensorrt_version: str = "10") -> list[LintIssue]:
    """Problems that would stop (or cripple) a TensorRT ``tensorrt_version`` build of ``model``."""
    version = _version_tuple(str(tensorrt_version))
    table = op_table(version[0])
    supported, unsupported = set(table["supported"]), set(table["unsupported"])
    issues = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = table["opset"]
    if opset is not None and not low <= opset <= high:
        issues.append(LintIssue(graph, "", "opset", f"opset {opset} is outside TensorRT "
                                f"{version[0]}'s range {low}..{high}; re-export with --opset"))
    constants = _constants(model)
    value_dependent = _value_dependent(model)
    for node in model.graph.node:
        op = node.op_type
        where = (graph, node.name, op)
        if node.domain not in ("", "ai.onnx"):
            issues.append(LintIssue(*where, f"custom domain {node.domain!r} needs a TensorRT plugin"))
            continue
        if op in unsupported or op not in supported:
            issues.append(LintIssue(*where, f"not supported by TensorRT {version[0]}'s ONNX parser"))
            continue
        since = table["since"].get(op)
        if since and version < _version_tuple(since):
            issues.append(LintIssue(*where, f"needs TensorRT {since} or newer"))
            continue
        if op in ROUTING_HAZARDS:
            issues.append(LintIssue(*where, f"{ROUTING_HAZARDS[op]}: not allowed in an edge engine"))
        if op == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in table["restrictions"]["Resize"]["mode"]:
                issues.append(LintIssue(*where, f"Resize mode {mode!r} is not supported (nearest, linear)"))
        if op == "TopK" and (len(node.input) < 2 or node.input[1] not in constants):
            issues.append(LintIssue(*where, "k is not a build-time constant"))
            continue
        shaped_by = [node.input[i] for i in SHAPE_INPUTS.get(op, ()) if i < len(node.input) and node.input[i]]
        data_shaped = [name for name in shaped_by if name in value_dependent]
        if data_shaped:
            issues.append(LintIssue(*where, f"data-dependent shape: input {data_shaped[0]!r} comes from "
                                            "tensor values, not from shapes or constants"))
    return issues


def lint_graph_file(path: str | Path, tensorrt_versions=TENSORRT_MAJORS) -> list[LintIssue]:
    model = onnx.load(str(path), load_external_data=False)
    issues = []
    for v in tensorrt_versions:
        issues.extend(lint_model(model, Path(path).name, str(v)))
    return issues


def check_bundle_graphs(bundle_dir: str | Path, files, tensorrt_versions=TENSORRT_MAJORS) -> None:
    """Raise ``MordasrError`` naming the first offending node of any of ``files``."""
    issues = [i for f in files for i in lint_graph_file(Path(bundle_dir) / f, tensorrt_versions)]
    if issues:
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        raise MordasrError(f"TensorRT lint failed: {issues[0]}{more}")
