"""How far a backend may drift from ONNX Runtime FP32 on one graph before it counts as a mismatch.

Shared by the device verification script (``verify_engines.sh``: ``polygraphy run`` per engine) and
``mordasr-run --compare-backends`` (Polygraphy's ``SimpleCompareFunc`` per graph output).
"""

from __future__ import annotations

import json
from pathlib import Path

from mordasr.runtime.manifest import GraphSpec

# (atol, rtol) per precision of the graph: FP32 engines differ from ONNX Runtime by accumulation
# order; FP16 and INT8 by their own rounding, which the accuracy report measures per bundle.
DEFAULT_TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


def bundle_tolerances(bundle_dir: Path, graphs: list[GraphSpec]) -> dict[str, tuple[float, float]]:
    """(atol, rtol) per graph key, the bundle's accuracy report read once."""
    report = Path(bundle_dir) / "accuracy.json"
    errors = []
    if report.is_file():
        errors = [r.get("max_abs_error") for r in json.loads(report.read_text()).get("rows", [])]
        errors = [e for e in errors if isinstance(e, (int, float))]
    tolerances = {}
    for graph in graphs:
        atol, rtol = DEFAULT_TOLERANCES.get(graph.precision, DEFAULT_TOLERANCES["fp32"])
        if errors and graph.precision != "fp32":
            # The report measures the bundle's graphs against FP32 on calibration images; an engine
            # may add its own rounding on top, so allow twice that before calling it a mismatch.
            atol = max(atol, 2 * max(errors))
        tolerances[graph.key] = (atol, rtol)
    return tolerances
