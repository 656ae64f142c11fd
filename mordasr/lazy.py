"""The one way mordasr imports an optional dependency (as Polygraphy's ``lazy_import``).

``lazy_import("tensorrt", "tensorrt", "the tensorrt backend")`` returns a stand-in module: the real
import happens at the first attribute access, and when it fails the error is a ``MordasrError``
that names the feature and the pip command. Importing a mordasr module therefore never needs an
optional package, and code keeps the plain ``trt.Builder(...)`` spelling that type checkers read
(under ``TYPE_CHECKING`` the real module is imported instead; see ``runtime/backends/tensorrt.py``).

A module counts as present only if it has the attribute that proves it is the real package
(``probe``): ``tensorrt-stubs`` alone makes ``import tensorrt`` succeed as an empty namespace
package, which must not pass for TensorRT.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mordasr.errors import MordasrError

# module -> (pip requirement, attribute only the real package has)
KNOWN = {
    "onnxruntime": ("onnxruntime (or onnxruntime-gpu on CUDA hosts)", "InferenceSession"),
    "tensorrt": ("tensorrt (JetPack ships it on Jetson)", "Builder"),
    "cuda.bindings.runtime": ("cuda-python", "cudaGetDeviceCount"),
    "polygraphy": ("polygraphy", "__version__"),
    "polygraphy.backend.trt": ("polygraphy", "EngineBytesFromNetwork"),
    "ray": ("'mordasr[serve]' (or pip install \"ray[serve,data]\")", "init"),
    "ray.serve": ("'mordasr[serve]' (or pip install \"ray[serve]\")", "deployment"),
    "ray.data": ("'mordasr[serve]' (or pip install \"ray[data]\")", "from_items"),
    "tritonclient.grpc.model_config_pb2": ("'mordasr[serve]' (or pip install \"tritonclient[grpc]\")", "ModelConfig"),
    "transformers": ("'mordasr[import]' (or pip install transformers)", "CLIPTextModel"),
    "matplotlib.pyplot": ("'mordasr[bench]' (or pip install matplotlib)", "figure"),
    "safetensors.numpy": ("safetensors", "load_file"),
    "matplotlib": ("matplotlib", "use"),
}


class MissingDependency(MordasrError):
    """An optional package a feature needs is not installed."""


def import_optional(name: str, purpose: str, pip: str | None = None) -> ModuleType:
    """Import ``name`` now, or raise ``MissingDependency`` saying what needs it and how to install it."""
    requirement, probe = KNOWN.get(name, (pip or name.split(".")[0], None))
    pip = pip or requirement
    try:
        module = importlib.import_module(name)
    except ImportError:
        module = None
    if module is None or (probe is not None and not hasattr(module, probe)):
        raise MissingDependency(f"{purpose} needs {name.split('.')[0]}, which is not installed here: "
                                f"pip install {pip}") from None
    return module


def has_module(name: str) -> bool:
    """Whether ``name`` imports as the real package (see ``KNOWN``'s probes)."""
    try:
        import_optional(name, "check")
    except MordasrError:
        return False
    return True


_PROBES = frozenset({"__path__", "__file__", "__spec__", "__loader__", "__wrapped__", "__all__",
                     "__origin__", "__getstate__", "__reduce_ex__", "__deepcopy__", "__copy__"})


class _LazyModule(ModuleType):
    def __init__(self, name: str, purpose: str, pip: str | None) -> None:
        super().__init__(name)
        self._lazy = (name, purpose, pip)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr in _PROBES:  # what tools ask of any module: answering must not import it
            raise AttributeError(attr)
        if self._module is None:
            self._module = import_optional(*self._lazy)
        return getattr(self._module, attr)


def lazy_import(name: str, purpose: str, pip: str | None = None) -> Any:
    """A module whose import waits for its first use (then ``import_optional``'s errors apply)."""
    return _LazyModule(name, purpose, pip)
