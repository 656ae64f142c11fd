"""Run one image through a bundle on two backends and report how far their outputs drift apart,
graph by graph and for the final image (``mordasr-run --compare-backends``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mordasr.errors import MordasrError


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
    for spec in specs:
        name, options = parse_backend_spec(spec)
        outputs: dict[str, np.ndarray] = {}
        restorer = Restorer(bundle, backend=name, tap=lambda g, _f, out, o=outputs: o.__setitem__(g.key, out),
                            **options)
        result = restorer.restore(image)
        outputs["image"] = result.image
        runs.append((outputs, result.bucket))
    (first, bucket_a), (second, bucket_b) = runs
    if bucket_a != bucket_b:
        raise MordasrError(f"the backends routed the image to different buckets ({bucket_a} vs {bucket_b}): "
                           "their router outputs differ; compare the router graph first")
    rows = []
    for key in first:
        diff = np.abs(first[key].astype(np.float64) - second[key].astype(np.float64))
        rows.append({"output": key, "max_abs": float(diff.max()), "mean_abs": float(diff.mean())})
    return rows
