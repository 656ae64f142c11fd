"""Turn a device profile into export settings, and check a written bundle against its memory.

Explicit command-line options win over the profile; the profile wins over the preset defaults.
Sizes are clamped to the preset's own largest profile (the tiny UNet attends over its whole
latent: its graphs stop at 512 px whatever the device holds).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mordasr.errors import MordasrError
from mordasr.export.memory import MemoryEstimate, check_budget, estimate_bundle
from mordasr.runtime.devices import DeviceProfile
from mordasr.runtime.manifest import Manifest, load_manifest

CONVERTED = ("encoder", "unet", "decoder")


@dataclass
class ExportPlan:
    sizes: dict[str, list[int]]  # min/opt/max output [h, w]
    workspace_mb: int
    optimization_level: int
    tactic_dram_mb: int | None
    precisions: dict[str, str]  # encoder/unet/decoder -> fp32/fp16/int8
    fp32_fallback: tuple[str, ...]
    modes: list[str]  # candidates in order
    bucket_switch: str = "graphs"
    max_engines: int | None = None
    max_batch: int = 1  # images per graph call the engines' profiles take
    device: DeviceProfile | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def headline_precision(self) -> str | None:
        """What calibration is asked for: int8 if any component is, else fp16, else None (all FP32)."""
        used = set(self.precisions.values())
        return "int8" if "int8" in used else "fp16" if "fp16" in used else None


def make_plan(preset_profile: dict[str, list[int]], allowed_modes: tuple[str, ...], *,
              device: DeviceProfile | None = None, sizes: dict[str, tuple[int, int] | None] | None = None,
              workspace_mb: int | None = None, optimization_level: int | None = None,
              precision: str | None = None, component_precision: dict[str, str] | None = None,
              fp32_fallback: tuple[str, ...] | None = None, mode: str | None = None,
              max_batch: int | None = None) -> ExportPlan:
    sizes = sizes or {}
    notes = []
    chosen_sizes = {}
    for k in ("min", "opt", "max"):
        if sizes.get(k):
            chosen_sizes[k] = list(sizes[k])
        elif device is not None:
            side = min(device.sizes[k], max(preset_profile[k]))
            if side < device.sizes[k]:
                notes.append(f"{k} size {device.sizes[k]} of {device.name} clamped to this preset's {side}")
            chosen_sizes[k] = [side, side]
        else:
            chosen_sizes[k] = list(preset_profile[k])
    base = {c: "fp32" for c in CONVERTED}
    if device is not None:
        base.update({c: device.precision[c] for c in CONVERTED})
    if precision:  # --fp16 / --int8 set every component the precision map does not name
        base = {c: precision for c in CONVERTED}
    base.update(component_precision or {})
    if fp32_fallback is None:
        fp32_fallback = tuple(device.fp32_fallback) if device is not None else ()
    fallback = tuple(c for c in fp32_fallback if c != "router" and base.get(c, "fp32") != "fp32")
    if mode:
        modes = [mode]
    elif device is not None:
        modes = [m for m in device.modes if m in allowed_modes] or [allowed_modes[0]]
    else:
        modes = [allowed_modes[0]]
    builder = device.builder if device is not None else None
    return ExportPlan(
        sizes=chosen_sizes,
        workspace_mb=workspace_mb or (builder.workspace_mb if builder else 4096),
        optimization_level=optimization_level if optimization_level is not None
        else (builder.optimization_level if builder else 3),
        tactic_dram_mb=builder.tactic_dram_mb if builder else None,
        precisions=base, fp32_fallback=fallback, modes=modes,
        bucket_switch=device.bucket_switch if device is not None else "graphs",
        max_engines=device.max_engines if device is not None else None,
        max_batch=max_batch or (device.max_batch if device is not None else 1),
        device=device, notes=notes)


def fit_to_device(bundle: str | Path, manifest: Manifest, plan: ExportPlan) -> tuple[MemoryEstimate, str]:
    """The memory estimate at the plan's max size and the bucket switch that fits the device.

    A folded bundle that does not fit with one graph set per bucket is tried with refit (one set
    plus weight packs). Raises ``MordasrError`` with the number and the limit when nothing fits.
    """
    max_hw = tuple(plan.sizes["max"])
    switches = [plan.bucket_switch]
    if manifest.mode == "folded" and manifest.weight_packs and "refit" not in switches:
        switches.append("refit")
    estimate = None
    for switch in switches:
        estimate = estimate_bundle(bundle, manifest, max_hw, switch, plan.max_engines)
        if plan.device is None or estimate.total <= plan.device.budget_bytes:
            return estimate, estimate.bucket_switch
    check_budget(estimate, plan.device.budget_bytes, plan.device.name)
    raise MordasrError("unreachable")  # check_budget raised


def export_to_fit(plan: ExportPlan, fitted: Path, export_mode: Callable[[str], list[Path]],
                  note: Callable[[str], None]) -> tuple[MemoryEstimate, str, list[Path]]:
    """Export in the plan's modes, in order, until the bundle fits the device.

    ``export_mode(mode)`` writes one mode's bundle(s) and returns the folders it wrote; ``fitted``
    is the one whose memory must fit (the headline precision's). A mode that does not fit is
    removed and the next one tried, with ``note`` saying why; when none fits, nothing is left
    behind and the last refusal is raised. Returns (estimate, bucket switch, folders written).
    """
    for attempt, mode in enumerate(plan.modes):
        written = export_mode(mode)
        try:
            estimate, switch = fit_to_device(fitted, load_manifest(fitted), plan)
            return estimate, switch, written
        except MordasrError as err:
            remove_bundles(written)
            if attempt + 1 == len(plan.modes):
                raise
            name = plan.device.name if plan.device else "the device"
            note(f"{mode} does not fit {name}: {err}; trying {plan.modes[attempt + 1]}")
    raise MordasrError("the plan has no export mode")


def remove_bundles(paths: list[Path]) -> None:
    """A refused or failed export leaves no bundle behind that the runtime would pick up."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def device_record(plan: ExportPlan, bucket_switch: str) -> dict:
    """What the manifest keeps of the device profile (the runtime compares it with its host)."""
    if plan.device is None:
        return {}
    record = plan.device.to_dict()
    record.update(bucket_switch=bucket_switch, max_engines=plan.max_engines,
                  applied={"sizes": plan.sizes, "precisions": plan.precisions,
                           "fp32_fallback": list(plan.fp32_fallback)})
    return record
