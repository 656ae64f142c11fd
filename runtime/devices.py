"""Device profiles: what a target (an 8 GB Orin Nano, a 24 GB desktop GPU, ...) can hold and build.

A profile is data (``device_profiles/<name>.json``, or a user's own file): memory and how much of it
a bundle may use, the GPU compute capabilities the target has, builder memory caps (an Orin Nano
runs out of memory building an engine that would fit at run time when the builder may use all
of it), engine shape sizes, per-component precision, which components keep an FP32 fallback, the
export modes in order of preference and how folded buckets are switched. ``mordasr-export
--device NAME`` applies one and records it in the manifest; ``mordasr-run`` compares it with the
machine it runs on. No torch, no TensorRT: plain JSON and ``/proc``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from mordasr.errors import MordasrError
from mordasr.records import from_dict

PROFILE_PATH_ENV = "MORDASR_DEVICE_PROFILES"  # extra folders of profile files, ':'-separated
PRECISION_CHOICES = ("fp32", "fp16", "int8")
COMPONENT_NAMES = ("router", "encoder", "unet", "decoder")
BUCKET_SWITCHES = ("graphs", "refit")
EXPORT_MODES = ("folded", "gated", "hybrid", "dense-lora", "adaptir")


@dataclass
class BuilderLimits:
    workspace_mb: int = 4096
    tactic_dram_mb: int | None = None  # TensorRT's TACTIC_DRAM pool: builder memory for tactics
    optimization_level: int = 3


@dataclass
class DeviceProfile:
    name: str
    description: str
    memory_gib: float  # GPU memory, or all memory on a unified-memory Jetson
    unified_memory: bool
    memory_budget: float  # fraction of memory_gib a bundle may use (OS, display, camera need the rest)
    compute_capabilities: list[str]
    tensorrt: str
    builder: BuilderLimits
    sizes: dict[str, int]  # engine profile, output pixels per side: min/opt/max
    precision: dict[str, str]  # component -> fp32/fp16/int8
    fp32_fallback: list[str]  # components whose FP32 graph ships as the NaN/inf fallback
    modes: list[str]  # export modes in order of preference; the first that fits is used
    bucket_switch: str = "graphs"  # folded buckets: one engine each, or one refitted engine
    max_engines: int = 8  # engines held at once (the LRU's capacity)
    max_batch: int = 1  # images per graph call the engines' profiles take (a server's batch)
    source: str = ""
    file: str = field(default="", compare=False)

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_gib * self.memory_budget * (1 << 30))

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("file")
        return data

    @classmethod
    def from_dict(cls, data: dict, file: str = "") -> "DeviceProfile":
        where = file or (data.get("name") if isinstance(data, dict) else None) or "device profile"
        if isinstance(data, dict) and "file" in data:
            raise MordasrError(f"{where}: unknown key 'file'")
        profile = replace(from_dict(cls, data, where), file=file)
        profile.validate(where)
        return profile

    def validate(self, where: str) -> None:
        def fail(message: str) -> None:
            raise MordasrError(f"{where}: {message}")

        if not self.memory_gib > 0:
            fail("memory_gib must be positive")
        if not 0 < self.memory_budget <= 1:
            fail("memory_budget is a fraction in (0, 1]")
        for cc in self.compute_capabilities:
            if not re.fullmatch(r"\d+\.\d+", str(cc)):
                fail(f"compute capability {cc!r} is not MAJOR.MINOR")
        sizes = self.sizes
        if set(sizes) != {"min", "opt", "max"} or not 0 < sizes["min"] <= sizes["opt"] <= sizes["max"]:
            fail("sizes needs min <= opt <= max output pixels")
        if set(self.precision) != set(COMPONENT_NAMES):
            fail(f"precision needs one entry per component: {', '.join(COMPONENT_NAMES)}")
        bad = [p for p in self.precision.values() if p not in PRECISION_CHOICES]
        if bad:
            fail(f"precision {bad[0]!r} is not one of {', '.join(PRECISION_CHOICES)}")
        unknown = [c for c in self.fp32_fallback if c not in COMPONENT_NAMES]
        if unknown:
            fail(f"fp32_fallback names unknown component {unknown[0]!r}")
        bad_modes = [m for m in self.modes if m not in EXPORT_MODES]
        if not self.modes or bad_modes:
            fail(f"modes must list export modes from {', '.join(EXPORT_MODES)}")
        if self.bucket_switch not in BUCKET_SWITCHES:
            fail(f"bucket_switch is one of {', '.join(BUCKET_SWITCHES)}")
        if self.max_engines < 1 or self.max_batch < 1 or self.builder.workspace_mb < 16:
            fail("max_engines and max_batch must be >= 1 and builder.workspace_mb >= 16")


def _builtin_files() -> dict[str, Path]:
    folder = resources.files("mordasr.runtime").joinpath("device_profiles")
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".json")}


def _user_files() -> dict[str, Path]:
    found = {}
    for folder in filter(None, os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep)):
        for file in sorted(Path(folder).glob("*.json")):
            found.setdefault(file.stem, file)
    return found


def available_profiles() -> dict[str, Path]:
    """Profile name -> file; a user's folder (``$MORDASR_DEVICE_PROFILES``) overrides built-ins."""
    return {**_builtin_files(), **_user_files()}


def load_device_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in or user profile by name, or a profile file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise MordasrError(f"device profile {path} does not exist")
        file = path
    else:
        known = available_profiles()
        if str(name_or_path) not in known:
            raise MordasrError(f"unknown device profile {str(name_or_path)!r}; known: {', '.join(sorted(known))} "
                               "(or give a .json file)")
        file = known[str(name_or_path)]
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MordasrError(f"{file}: unreadable device profile ({err})") from None
    return DeviceProfile.from_dict(data, str(file))


@dataclass
class HostDevice:
    """What this machine is, as far as ``/proc`` and ``nvidia-smi`` tell without CUDA."""

    name: str
    memory_gib: float | None  # GPU memory, or all memory on a Jetson; None: unknown
    compute_capability: str | None  # None: no NVIDIA GPU seen
    unified_memory: bool = False


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        return None
    return None


def detect_host() -> HostDevice:
    model_file = Path("/proc/device-tree/model")
    if model_file.is_file():
        model = model_file.read_bytes().decode(errors="replace").strip("\x00 \n")
        if "jetson" in model.lower() or "nvidia" in model.lower():
            cc = "11.0" if "thor" in model.lower() else "8.7" if "orin" in model.lower() else None
            return HostDevice(model, _meminfo_gib(), cc, unified_memory=True)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            name, mib, cc = [p.strip() for p in out.splitlines()[0].split(",")]
            return HostDevice(name, float(mib) / 1024, cc)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return HostDevice("CPU only (no NVIDIA GPU found)", _meminfo_gib(), None)


def device_warnings(profile: dict | DeviceProfile, host: HostDevice) -> list[str]:
    """Why this machine is not the device the bundle was exported for (empty: it matches)."""
    p = profile if isinstance(profile, dict) else profile.to_dict()
    name = p["name"]
    warnings = []
    if host.compute_capability is None:
        warnings.append(f"the bundle was exported for device profile {name} ({p['description']}); "
                        f"this machine has no NVIDIA GPU, so its engines and memory plan do not apply here")
        return warnings
    if host.compute_capability not in p["compute_capabilities"]:
        warnings.append(f"the bundle's device profile {name} is for compute capability "
                        f"{'/'.join(p['compute_capabilities'])}, this GPU ({host.name}) is "
                        f"{host.compute_capability}: TensorRT engines must be rebuilt here")
    # A module reports less than its label (an 8 GB Orin Nano shows about 7.4 GiB: carve-outs).
    if host.memory_gib is not None and host.memory_gib < 0.85 * p["memory_gib"]:
        warnings.append(f"this device has {host.memory_gib:.1f} GiB, the bundle's profile {name} plans for "
                        f"{p['memory_gib']:g} GiB: expect swapping or out-of-memory; re-export with a "
                        "smaller --device")
    return warnings
