"""Run one image through a bundle on two backends and report how far their outputs drift apart,
graph by graph and for the final image (``mordasr-run --compare-backends``).

The verdict per output is Polygraphy's (``SimpleCompareFunc``, the comparison ``polygraphy run``
and ``verify_engines.sh`` make), with the tolerance of the graph's precision widened by the
bundle's accuracy report (``runtime/tolerances.py``); the final image takes the decoder's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import MordasrError
from mordasr.lazy import has_module, import_optional
from mordasr.runtime.manifest import GraphSpec
from mordasr.runtime.tolerances import DEFAULT_TOLERANCES, bundle_tolerances


def parse_backend_spec(spec: str) -> tuple[str, dict]:
    """'onnxruntime' or 'tensorrt:refit' -> (backend name, options)."""
    from mordasr.runtime.backends import BACKENDS

    name, _, switch = spec.strip().partition(":")
    if name not in BACKENDS:
        raise MordasrError(f"unknown backend {name!r} in --compare-backends; choose from {', '.join(BACKENDS)}")
    if switch and switch not in ("graphs", "refit"):
        raise MordasrError(f"unknown bucket switch {switch!r} in {spec!r}: use graphs or refit")
    return name, ({"bucket_switch": switch} if switch else {})


def compare_backends(bundle: str | Path, image: np.ndarray, specs: list[str]) -> list[dict]:
    """Rows {"output", "max_abs", "mean_abs"} per graph output and for the image, first vs second."""
    from mordasr.runtime.pipeline import Restorer

    if len(specs) != 2:
        raise MordasrError("--compare-backends takes exactly two backends, e.g. onnxruntime,tensorrt")
    runs = []
    graphs: dict[str, GraphSpec] = {}
    for spec in specs:
        name, options = parse_backend_spec(spec)
        outputs: dict[str, np.ndarray] = {}

        def tap(graph: GraphSpec, _feeds, out: np.ndarray, outputs=outputs) -> None:
            outputs[graph.key] = out
            graphs[graph.key] = graph

        restorer = Restorer(bundle, backend=name, tap=tap, **options)
        result = restorer.restore(image)
        outputs["image"] = np.ascontiguousarray(result.image)  # Polygraphy's comparison views its arrays
        runs.append((outputs, result.bucket))
    (first, bucket_a), (second, bucket_b) = runs
    if bucket_a != bucket_b:
        raise MordasrError(f"the backends routed the image to different buckets ({bucket_a} vs {bucket_b}): "
                           "their router outputs differ; compare the router graph first")
    tolerances = bundle_tolerances(Path(bundle), list(graphs.values()))
    decoder = next((k for k in tolerances if k.startswith("decoder")), None)
    tolerances["image"] = tolerances[decoder] if decoder else DEFAULT_TOLERANCES["fp32"]
    verdicts = polygraphy_verdicts(first, second, tolerances)
    rows = []
    for key in first:
        diff = np.abs(first[key].astype(np.float64) - second[key].astype(np.float64))
        rows.append({"output": key, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                     "atol": tolerances[key][0], "rtol": tolerances[key][1],
                     "passed": verdicts.get(key) if verdicts is not None else None})
    return rows


def polygraphy_verdicts(first: dict[str, np.ndarray], second: dict[str, np.ndarray],
                        tolerances: dict[str, tuple[float, float]]) -> dict[str, bool] | None:
    """Polygraphy's pass/fail per output (None when polygraphy is not installed: the lean runtime
    does not need it, and the statistics above still print)."""
    if not has_module("polygraphy"):
        return None
    comparator = import_optional("polygraphy.comparator", "judging --compare-backends", "polygraphy")
    from polygraphy.logger import G_LOGGER

    results = comparator.RunResults()
    for runner, outputs in (("first", first), ("second", second)):
        results.append((runner, [comparator.IterationResult(outputs, runner_name=runner)]))
    compare = comparator.SimpleCompareFunc(atol={k: t[0] for k, t in tolerances.items()},
                                           rtol={k: t[1] for k, t in tolerances.items()})
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # its per-output report would flood the terminal
        accuracy = comparator.Comparator.compare_accuracy(results, compare_func=compare)
    # One comparison: an AccuracyResult {(runner, runner): [per-iteration {output: result}]},
    # which Polygraphy 0.50+ wraps in an AccuracyResults list.
    pairs = accuracy.lst[0] if hasattr(accuracy, "lst") else accuracy
    (iteration,) = pairs[("first", "second")]
    return {key: bool(iteration[key]) for key in first}
