"""What a TensorRT build needs, decided without TensorRT: flags per version, shape profiles,
which graphs get engines, and the build options. The builder (``runtime/trt_build.py``) and the
on-device script (``export/engine_script.py``) both read these decisions, so they build the same
engine.

Two API generations:
- TensorRT 10 (JetPack 6 on Orin): weak typing by default: the network's reduced precision comes
  from builder flags (FP16; INT8 for Q/DQ graphs). ``strongly_typed=True`` opts into the
  STRONGLY_TYPED network flag instead, where the graph's own types decide.
- TensorRT 11: every network is strongly typed and the precision flags are gone (FP16 lives in
  the graph's types, INT8 in its Q/DQ nodes; there are no implicit calibrators), so the bundle's
  precision must already be in the graph.
Refit: REFIT makes every weight refittable. TensorRT 11.3 documents that REFIT may drop a GEMM
bias (its known issues); REFIT_IDENTICAL avoids it but only allows refitting identical weights,
which bucket switching does not do, so 11.3+ uses REFIT_INDIVIDUAL with just the weight-pack
tensors marked refittable (``INetworkDefinition.mark_weights_refittable``). trtexec has no
option for either, so those builds go through Polygraphy (``polygraphy convert`` with the
bundle's ``engines/trt_postprocess.py``), never through trtexec.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mordasr.errors import MordasrError
from mordasr.records import from_dict
from mordasr.runtime.engine_names import TensorRTVersion
from mordasr.runtime.manifest import GraphSpec, Manifest
from mordasr.runtime.routing import MAX_WINDOWS

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_MB = 4096
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level


@dataclass
class EngineOptions:
    """How a bundle's engines are built. The exporter records them in the manifest
    (``Manifest.engine_options``), and the runtime's engine cache builds with the same ones, so an
    engine is the same whichever side built it. The batch sizes are not here: they come from what
    the runtime sends (``graph_batch``)."""

    min_size: str = "256"
    opt_size: str = "512"
    max_size: str = "1024"
    refittable: bool = False  # folded bundles: bucket 0's encoder and UNet refittable (``graph_refittable``)
    strongly_typed: bool | None = None
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    optimization_level: int = DEFAULT_OPT_LEVEL
    tactic_dram_mb: int | None = None  # cap on builder tactic memory (unified memory on Jetson)

    def to_dict(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict) -> "EngineOptions":
        return from_dict(cls, data, "engine options")

    def pool_limits_mb(self) -> dict[str, int]:
        """Memory pool caps by ``trt.MemoryPoolType`` name (Polygraphy's ``--pool-limit`` names
        them in lower case)."""
        pools = {"WORKSPACE": self.workspace_mb}
        if self.tactic_dram_mb:
            # On a Jetson the builder's tactic memory comes out of the RAM the OS runs in: an
            # uncapped build runs out of memory for an engine that would fit (NVIDIA/TensorRT#3355).
            pools["TACTIC_DRAM"] = self.tactic_dram_mb
        return pools


def graph_refittable(manifest: Manifest, graph: GraphSpec, refittable: bool) -> bool:
    """Whether ``graph``'s engine is built refittable: only the graphs whose weights differ between
    folded buckets (bucket 0's encoder and UNet, which have weight packs) are; the router and the
    decoder would be refittable for nothing (and slower, and refused by trtexec on TensorRT 11.3+)."""
    return (refittable and not graph.fallback and graph.bucket == 0
            and manifest.weight_pack(graph.component, 0) is not None)


def graph_batch(manifest: Manifest, graph: GraphSpec) -> tuple[int, int, int]:
    """(min, opt, max) batch of a graph's profile: what the runtime feeds it. The router scores up
    to ``MAX_WINDOWS`` native-resolution windows of each image, for up to ``manifest.max_batch``
    images at once (``Restorer.scores_batch``); the encoder, UNet and decoder take at most
    ``manifest.max_batch`` images (``Restorer.restore_batch`` splits a larger group), and a tiled
    image runs one tile at a time."""
    if graph.component == "router":
        return 1, MAX_WINDOWS, MAX_WINDOWS * manifest.max_batch
    return 1, 1, manifest.max_batch


def engine_graphs(manifest: Manifest, refittable: bool) -> list[GraphSpec]:
    """Graphs that get an engine. A refittable folded bundle with weight packs builds bucket 0's
    encoder and UNet only: the other buckets are reached by refitting those engines."""
    graphs = []
    for g in manifest.graphs:
        if (refittable and not g.fallback and g.bucket not in (None, 0)
                and manifest.weight_pack(g.component, g.bucket) is not None):
            continue
        graphs.append(g)
    return graphs


@dataclass
class BuildSettings:
    """Flag names as in ``tensorrt.NetworkDefinitionCreationFlag`` / ``tensorrt.BuilderFlag``."""

    network_flags: list[str] = field(default_factory=list)
    builder_flags: list[str] = field(default_factory=list)
    refit_only_packs: bool = False  # mark only weight-pack tensors refittable
    notes: list[str] = field(default_factory=list)

    @property
    def needs_postprocess(self) -> bool:
        """REFIT_INDIVIDUAL and the marking of refittable weights exist in TensorRT's API only:
        neither trtexec nor Polygraphy's flags can ask for them."""
        return self.refit_only_packs or "REFIT_INDIVIDUAL" in self.builder_flags

    def polygraphy_args(self) -> list[str]:
        """``polygraphy convert`` flags (REFIT_INDIVIDUAL goes through the postprocess script)."""
        mapping = {"FP16": "--fp16", "INT8": "--int8", "REFIT": "--refittable"}
        args = ["--strongly-typed"] if "STRONGLY_TYPED" in self.network_flags else []
        return args + [mapping[f] for f in self.builder_flags if f in mapping]

    def trtexec_args(self) -> list[str]:
        """trtexec flags; refused where trtexec would build a different engine (see module doc)."""
        if self.needs_postprocess:
            raise MordasrError("trtexec cannot build this engine: REFIT_INDIVIDUAL with marked "
                               "weights exists only in TensorRT's API; build it with Polygraphy")
        mapping = {"FP16": "--fp16", "INT8": "--int8", "REFIT": "--refit"}
        args = ["--stronglyTyped"] if "STRONGLY_TYPED" in self.network_flags else []
        return args + [mapping[f] for f in self.builder_flags if f in mapping]


def build_settings(version: TensorRTVersion, precision: str, refittable: bool = False,
                   strongly_typed: bool | None = None) -> BuildSettings:
    if precision not in PRECISIONS:
        raise MordasrError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    settings = BuildSettings()
    if version.major >= 11:
        if strongly_typed is False:
            raise MordasrError("TensorRT 11 has no weak typing: precision comes from the graph; "
                               "export with --fp16 or --int8 instead of asking the builder")
        # Strong typing is always on; the creation flag is accepted but ignored.
        settings.notes.append("strongly typed (TensorRT 11): precision from the graph's types and Q/DQ")
    elif strongly_typed:
        settings.network_flags.append("STRONGLY_TYPED")
    else:
        if precision == "fp16":
            settings.builder_flags.append("FP16")
        elif precision == "int8":
            # Q/DQ graphs need INT8 enabled under weak typing; the float remainder stays FP32
            # as calibrated (no FP16 flag), so the accuracy report still describes the engine.
            settings.builder_flags.append("INT8")
    if refittable:
        if version >= TensorRTVersion(11, 3):
            settings.builder_flags.append("REFIT_INDIVIDUAL")
            settings.refit_only_packs = True
            settings.notes.append("TensorRT 11.3+ may drop GEMM biases with REFIT: only weight-pack "
                                  "tensors are made refittable (REFIT_INDIVIDUAL)")
        else:
            settings.builder_flags.append("REFIT")
    return settings


# -- shape profiles -----------------------------------------------------------------------------

def parse_size(text: str | int) -> tuple[int, int]:
    """'512' or '768x512' (width x height, output pixels) -> (height, width)."""
    if isinstance(text, int):
        return text, text
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not match:
        raise MordasrError(f"bad size {text!r}: use N or WxH in output pixels, e.g. 512 or 768x512")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width < 1 or height < 1:
        raise MordasrError(f"bad size {text!r}: sides must be positive")
    return height, width


def _dims_for(manifest: Manifest, out_hw: tuple[int, int], round_up: bool) -> dict[str, int]:
    """Named dynamic dims for an output size, rounded to what the graphs accept."""
    s, m, f = manifest.scale, manifest.lr_multiple, manifest.latent_downsample
    dims = {}
    for axis, out in zip(("height", "width"), out_hw):
        lr = out / s
        lr = (math.ceil(lr / m) if round_up else max(1, math.floor(lr / m))) * m
        dims[axis] = lr
        dims[f"latent_{axis}"] = lr * s // f
        dims[f"out_{axis}"] = lr * s
    return dims


def profile_shapes(manifest: Manifest, graph: GraphSpec, min_size, opt_size, max_size) -> dict[str, list[list[int]]]:
    """{input name: [min, opt, max] shape} for one graph from output sizes in pixels; the batch
    dimension from ``graph_batch``."""
    sizes = [parse_size(v) for v in (min_size, opt_size, max_size)]
    for lo, hi in zip(sizes, sizes[1:]):
        if lo[0] > hi[0] or lo[1] > hi[1]:
            raise MordasrError("profile sizes must satisfy min <= opt <= max on both sides")
    batch = graph_batch(manifest, graph)
    named = [_dims_for(manifest, hw, round_up=i == 2) for i, hw in enumerate(sizes)]
    profile = {}
    for tensor in graph.inputs:
        shapes = []
        for i, dims in enumerate(named):
            shape = []
            for d in tensor.shape:
                if isinstance(d, int):
                    shape.append(d)
                elif d == "batch":
                    shape.append(batch[i])
                elif d in dims:
                    shape.append(dims[d])
                else:
                    raise MordasrError(f"{graph.file}: input {tensor.name} has an unknown dynamic dim {d!r}")
            shapes.append(shape)
        profile[tensor.name] = shapes
    return profile


def min_input_size(manifest: Manifest, min_size: str | int) -> tuple[int, int]:
    """The smallest LR (height, width) an engine built at ``min_size`` takes; the runtime pads a
    smaller image up to it."""
    dims = _dims_for(manifest, parse_size(min_size), round_up=False)
    return dims["height"], dims["width"]


def profile_advice(graph: str, name: str, shape: tuple[int, ...], profile: list[list[int]] | None,
                   max_batch: int) -> str:
    """Why an engine's profile refuses an input shape, and what to do about it."""
    head = f"{graph}: input {name} of shape {tuple(shape)} is outside the engine's profile"
    if profile is None:
        return f"{head}; rebuild the engine (bash build_engines.sh)"
    lo, _, hi = profile
    head += f" ({tuple(lo)} .. {tuple(hi)})"
    if len(shape) != len(hi):
        return f"{head}: the engine was built from another graph; rebuild it (bash build_engines.sh)"
    if shape[0] > hi[0]:
        return (f"{head}: a batch of {shape[0]}, the engine takes {hi[0]}; the bundle records max_batch "
                f"{max_batch}: the engine was built for another bundle, rebuild it (bash build_engines.sh), or "
                "re-export with a larger --max-batch")
    if any(s > h for s, h in zip(shape[2:], hi[2:])):
        return f"{head}: larger than its largest size; tile smaller (--tile) or re-export with a larger --max-size"
    if any(s < low for s, low in zip(shape[2:], lo[2:])):
        return f"{head}: smaller than its smallest size; re-export with a smaller --min-size"
    return f"{head}; rebuild the engine (bash build_engines.sh)"


def recorded_engine_options(manifest: Manifest) -> EngineOptions:
    """The options the exporter built (or would build) the bundle's engines with, so an engine the
    cache builds is the one ``build_engines.sh`` builds. Bundles older than the record: their
    profile sizes and device caps."""
    if manifest.engine_options:
        return EngineOptions.from_dict(manifest.engine_options)
    sizes = {k: f"{hw[1]}x{hw[0]}" for k, hw in manifest.profile.items()} or {}
    builder = manifest.device.get("builder", {})
    defaults = EngineOptions()
    return EngineOptions(min_size=sizes.get("min", defaults.min_size), opt_size=sizes.get("opt", defaults.opt_size),
                         max_size=sizes.get("max", defaults.max_size),
                         refittable=manifest.device.get("bucket_switch") == "refit",
                         workspace_mb=builder.get("workspace_mb", defaults.workspace_mb),
                         tactic_dram_mb=builder.get("tactic_dram_mb"),
                         optimization_level=builder.get("optimization_level", defaults.optimization_level))
