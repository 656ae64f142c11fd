"""TensorRT build steps only its API can express, for Polygraphy.

``mordasr-export`` copies this file, unchanged, into every bundle as ``engines/trt_postprocess.py``
beside ``engines/refit_marks.json`` (graph key -> the names of its weight-pack tensors), and
``build_engines.sh`` points ``polygraphy convert`` at it:

- ``--trt-npps engines/trt_postprocess.py:mark_pack_weights`` with ``MORDASR_REFIT_GRAPH`` set to
  the graph's key marks exactly that graph's weight-pack tensors refittable;
- ``--trt-cpps engines/trt_postprocess.py:refit_individual`` then makes only the marked weights
  refittable (TensorRT 11.3+: REFIT may drop a GEMM bias, REFIT_INDIVIDUAL does not).

``runtime/trt_build.py`` calls the same functions when ``mordasr-export --engines`` or the engine
cache builds. The file imports nothing from mordasr (a device may build with Polygraphy alone);
``.ci/typecheck.sh`` checks it against TensorRT's own API (tensorrt-stubs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorrt as trt

MARKS_FILE = "refit_marks.json"
GRAPH_ENV = "MORDASR_REFIT_GRAPH"


def mark_refittable(network: trt.INetworkDefinition, names: Sequence[str]) -> None:
    """Mark exactly ``names`` refittable. ``mark_weights_refittable`` returns False for a name the
    network does not hold as a weight; an engine built on would fail at its first refit on the
    device, so the build stops here."""
    refused = [name for name in names if not network.mark_weights_refittable(name)]
    if refused:
        raise RuntimeError(f"TensorRT would not mark {len(refused)} weight-pack tensors refittable "
                           f"(e.g. {refused[0]}): the pack does not match the graph; re-export the bundle")


def refit_marks(graph: str, folder: str | Path | None = None) -> list[str]:
    """The weight-pack tensor names recorded for ``graph`` in ``folder/refit_marks.json``
    (default: beside this file, as in a bundle's ``engines/``)."""
    path = Path(folder if folder is not None else Path(__file__).parent) / MARKS_FILE
    marks = json.loads(path.read_text())
    if graph not in marks:
        raise RuntimeError(f"{path} has no refittable weights for graph {graph!r}; re-export the bundle")
    return list(marks[graph])


def mark_pack_weights(network: trt.INetworkDefinition) -> None:
    """Polygraphy network postprocess: mark the weight-pack tensors of the graph named by
    ``$MORDASR_REFIT_GRAPH`` (set by ``build_engines.sh`` for each build)."""
    graph = os.environ.get(GRAPH_ENV)
    if not graph:
        raise RuntimeError(f"set {GRAPH_ENV} to the graph being built (build_engines.sh does)")
    mark_refittable(network, refit_marks(graph))


def refit_individual(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> None:
    """Polygraphy config postprocess: only the marked weights are refittable (TensorRT 11.3+)."""
    import tensorrt as trt

    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
