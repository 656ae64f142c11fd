"""TensorRT engine naming and compatibility, shared by the exporter and the runtime (no TensorRT
import: plain strings). A plan only runs on the GPU compute capability and TensorRT version it
was built with, so both are in its file name and checked before deserializing."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mordasr.errors import MordasrError
from mordasr.runtime.manifest import GraphSpec


@dataclass(frozen=True, order=True)
class TensorRTVersion:
    major: int
    minor: int = 0
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> "TensorRTVersion":
        match = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
        if not match:
            raise MordasrError(f"cannot read a TensorRT version from {text!r}")
        major, minor, patch = (int(g) if g else 0 for g in match.groups())
        if major < 10:
            raise MordasrError(f"TensorRT {text} is not supported: mordasr builds with TensorRT 10 or 11 "
                               "(JetPack 6 ships TensorRT 10)")
        return cls(major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def compute_capability_tag(cc: str) -> str:
    """'8.7' -> 'sm87'."""
    match = re.fullmatch(r"(\d+)\.(\d+)", str(cc).strip())
    if not match:
        raise MordasrError(f"bad compute capability {cc!r}: expected MAJOR.MINOR such as 8.7")
    return f"sm{match.group(1)}{match.group(2)}"


def engine_file_name(graph: GraphSpec, cc: str, version: TensorRTVersion | str) -> str:
    """Engines are named by graph, GPU compute capability, TensorRT version and precision, so one
    bundle folder can hold engines for several devices without one overwriting another."""
    version = version if isinstance(version, TensorRTVersion) else TensorRTVersion.parse(version)
    return f"engines/{graph.key}.{compute_capability_tag(cc)}.trt{version}.{graph.precision}.plan"


def engine_mismatch(engine_cc: str, engine_trt: str, device_cc: str, runtime_trt: str) -> str | None:
    """Why an engine cannot run here (one line that says what to rebuild), or None."""
    problems = []
    if compute_capability_tag(engine_cc) != compute_capability_tag(device_cc):
        problems.append(f"built for compute capability {engine_cc}, this GPU is {device_cc}")
    if TensorRTVersion.parse(engine_trt) != TensorRTVersion.parse(runtime_trt):
        problems.append(f"built with TensorRT {engine_trt}, this runtime is TensorRT {runtime_trt}")
    if not problems:
        return None
    return "; ".join(problems) + " (rebuild on this device: mordasr-export --engines, or build_engines.sh)"


class LRUCache:
    """At most ``capacity`` loaded items; the least recently used one is closed to make room
    (``--max-engines``: a Jetson cannot hold every bucket's engine at once)."""

    def __init__(self, capacity: int, close: Callable[[Any], None] = lambda item: None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.close = close
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        while len(self._items) >= self.capacity:
            _, old = self._items.popitem(last=False)
            self.close(old)
        item = load()
        self._items[key] = item
        return item

    def keys(self) -> list[str]:
        return list(self._items)

    def clear(self) -> None:
        """Close every item (least recently used first)."""
        while self._items:
            _, old = self._items.popitem(last=False)
            self.close(old)

    def __len__(self) -> int:
        return len(self._items)
