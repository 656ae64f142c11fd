"""A test-only stand-in for the TensorRT runtime API and CUDA calls the ``tensorrt`` backend makes.

It enforces what TensorRT enforces, so the backend can be driven with a real photograph's shapes
where TensorRT cannot be installed:

- ``IExecutionContext.set_input_shape`` returns False for a shape outside the engine's profile;
- ``Refitter(engine, logger)`` fails on an engine not built refittable (TensorRT logs
  ``condition: e.isRefittable()`` and the binding gets a null refitter), and ``set_named_weights``
  returns False for a weight the engine cannot refit;
- ``execute_async_v3`` returns False when an input's shape or any tensor's address is not set.

An engine here is an ONNX graph plus the profile and refit settings it was "built" with
(``standin_plan``), run by ONNX Runtime on the CPU: its outputs are the graph's. Device memory is
host memory (``StandinCuda``), and work enqueued while a CUDA graph is captured is recorded and
replayed at launch, as CUDA does.

Every class derives from TensorRT's own class under ``TYPE_CHECKING`` and marks its methods
``@override``: ``.ci/typecheck.sh`` runs mypy over this module against ``tensorrt-stubs``, so a
method that TensorRT does not have, or a signature that drifts from TensorRT's, fails CI.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from typing_extensions import override

if TYPE_CHECKING:
    import tensorrt as trt

    _Engine = trt.ICudaEngine
    _Context = trt.IExecutionContext
    _Runtime = trt.Runtime
    _Refitter = trt.Refitter
    _Logger = trt.Logger
    _Weights = trt.Weights
else:
    _Engine = _Context = _Runtime = _Refitter = _Logger = _Weights = object

__version__ = "10.3.0"
MAGIC = b"MORDASR-STANDIN-PLAN\n"


class TensorIOMode:
    INPUT = "INPUT"
    OUTPUT = "OUTPUT"


class DataType:
    FLOAT = "FLOAT"


def nptype(dtype: Any) -> type:
    return {DataType.FLOAT: np.float32}[dtype]


class Logger(_Logger):
    WARNING: ClassVar[Any] = 2

    def __init__(self, min_severity: Any = WARNING) -> None:
        self.errors: list[str] = []


class Weights(_Weights):
    def __init__(self, a: np.ndarray) -> None:
        self.array = np.array(a)


def standin_plan(onnx_path: str | Path, profile: dict[str, list[list[int]]], refittable_weights: Sequence[str] = (),
                 refittable: bool = False) -> bytes:
    """The bytes of a stand-in engine: the graph, its [min, opt, max] shape per input, and the
    weights it can refit (none unless built refittable)."""
    spec = {"onnx": str(onnx_path), "profile": profile, "refittable": refittable,
            "refittable_weights": list(refittable_weights) if refittable else []}
    return MAGIC + json.dumps(spec).encode()


class StandinCuda:
    """``mordasr.runtime.cuda_runtime``'s functions over host memory."""

    def __init__(self) -> None:
        self.blocks: dict[int, ctypes.Array] = {}
        self.capturing: list[Callable[[], None]] | None = None
        self.graph_launches = 0

    def _alloc(self, nbytes: int) -> int:
        block = (ctypes.c_byte * nbytes)()
        address = ctypes.addressof(block)
        self.blocks[address] = block
        return address

    def malloc(self, nbytes: int) -> int:
        return self._alloc(nbytes)

    def malloc_host(self, nbytes: int) -> int:
        return self._alloc(nbytes)

    def free(self, pointer: int) -> None:
        del self.blocks[pointer]

    def free_host(self, pointer: int) -> None:
        del self.blocks[pointer]

    def copy_to_device(self, device: int, host: int, nbytes: int, stream: int) -> None:
        self._enqueue(lambda: ctypes.memmove(device, host, nbytes))

    def copy_to_host(self, host: int, device: int, nbytes: int, stream: int) -> None:
        self._enqueue(lambda: ctypes.memmove(host, device, nbytes))

    def _enqueue(self, work: Callable[[], Any]) -> None:
        if self.capturing is not None:
            self.capturing.append(lambda: work() and None)
        else:
            work()

    def device_capability(self, device: int = 0) -> str:
        return "8.7"

    def stream_create(self) -> int:
        return 1

    def stream_synchronize(self, stream: int) -> None:
        pass

    def stream_destroy(self, stream: int) -> None:
        pass

    def begin_capture(self, stream: int) -> None:
        self.capturing = []

    def end_capture(self, stream: int) -> list[Callable[[], None]]:
        graph, self.capturing = self.capturing or [], None
        return graph

    def graph_instantiate(self, graph: list[Callable[[], None]]) -> list[Callable[[], None]]:
        return list(graph)

    def graph_launch(self, graph_exec: list[Callable[[], None]], stream: int) -> None:
        self.graph_launches += 1
        for work in graph_exec:
            work()

    def graph_destroy(self, graph: object) -> None:
        pass

    def graph_exec_destroy(self, graph_exec: object) -> None:
        pass


CUDA = StandinCuda()  # the one "device" the stand-in engines run on


class ICudaEngine(_Engine):
    def __init__(self, spec: dict) -> None:
        import onnx
        import onnxruntime as ort

        self.spec = spec
        self.path = spec["onnx"]
        self.model = onnx.load(self.path)
        self.profile: dict[str, list[list[int]]] = spec["profile"]
        self.inputs = [i.name for i in self.model.graph.input]
        self.outputs = [o.name for o in self.model.graph.output]
        self.overrides: dict[str, np.ndarray] = {}
        self.ort = ort
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.shape_cache: dict[tuple, dict[str, tuple[int, ...]]] = {}

    @property
    @override
    def num_io_tensors(self) -> int:
        return len(self.inputs) + len(self.outputs)

    @property
    @override
    def refittable(self) -> bool:
        return bool(self.spec["refittable"])

    @override
    def get_tensor_name(self, index: int) -> str:
        return (self.inputs + self.outputs)[index]

    @override
    def get_tensor_mode(self, name: str) -> Any:
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    @override
    def get_tensor_dtype(self, name: str) -> Any:
        return DataType.FLOAT

    @override
    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Any]:
        if profile_index != 0 or name not in self.profile:
            raise RuntimeError(f"no profile {profile_index} for {name}")
        return [tuple(s) for s in self.profile[name]]

    @override
    def create_execution_context(self, *args: Any, **kwargs: Any) -> IExecutionContext:
        return IExecutionContext(self)

    def output_shapes(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The graph's output shapes for these input shapes (from one run on zeros, kept per shape:
        TensorRT knows them from the input shapes alone, as the graphs have no data-dependent shapes)."""
        key = tuple(sorted(shapes.items()))
        if key not in self.shape_cache:
            feeds = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
            outputs = self.session.run(self.outputs, feeds)
            self.shape_cache[key] = {n: tuple(v.shape) for n, v in zip(self.outputs, outputs)}
        return self.shape_cache[key]

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        self.overrides.update({k: np.ascontiguousarray(v) for k, v in weights.items()})
        options = self.ort.SessionOptions()
        # ORT's ALL level pre-packs conv weights from the graph before overrides apply
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # the session reads these buffers for as long as it lives: keep them referenced
        self.values = [self.ort.OrtValue.ortvalue_from_numpy(v) for v in self.overrides.values()]
        for name, value in zip(self.overrides, self.values):
            options.add_initializer(name, value)
        self.session = self.ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])


class IExecutionContext(_Context):
    def __init__(self, engine: ICudaEngine) -> None:
        self._engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.runs = 0

    @property
    @override
    def engine(self) -> ICudaEngine:
        return self._engine

    @override
    def set_input_shape(self, name: str, shape: Any) -> bool:
        lo, _, hi = self._engine.profile.get(name, [[], [], []])
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(hi) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False  # what TensorRT answers outside the profile
        self.shapes[name] = shape
        return True

    @override
    def get_tensor_shape(self, name: str) -> Any:
        if name in self._engine.inputs:
            return self.shapes[name]
        if set(self.shapes) != set(self._engine.inputs):
            return (-1,)
        return self._engine.output_shapes(self.shapes)[name]

    @override
    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.addresses[name] = memory
        return True

    @override
    def execute_async_v3(self, stream_handle: int) -> bool:
        names = self._engine.inputs + self._engine.outputs
        if set(self.shapes) != set(self._engine.inputs) or any(n not in self.addresses for n in names):
            return False  # an input without a shape, or a tensor without an address: TensorRT refuses
        shapes, addresses = dict(self.shapes), dict(self.addresses)

        def run() -> None:
            feeds = {n: _read(addresses[n], shapes[n]).copy() for n in self._engine.inputs}
            results = self._engine.session.run(self._engine.outputs, feeds)
            for name, value in zip(self._engine.outputs, results):
                _read(addresses[name], value.shape)[...] = value
            self.runs += 1

        CUDA._enqueue(run)
        return True


def _read(address: int, shape: Sequence[int]) -> np.ndarray:
    count = int(np.prod(shape)) * 4
    return np.ctypeslib.as_array((ctypes.c_byte * count).from_address(address)).view(np.float32).reshape(shape)


class Runtime(_Runtime):
    def __init__(self, logger: Any) -> None:
        self._logger = logger

    @override
    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine:
        data = bytes(serialized_engine)
        if not data.startswith(MAGIC):
            return None  # type: ignore[return-value]  # TensorRT returns None for a plan it cannot read
        return ICudaEngine(json.loads(data[len(MAGIC):]))


class Refitter(_Refitter):
    def __init__(self, engine: ICudaEngine, logger: Any) -> None:
        if not engine.refittable:
            logger.errors.append("Error Code 3: API Usage Error (condition: e.isRefittable())")
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.engine = engine
        self.pending: dict[str, np.ndarray] = {}

    @override
    def get_all_weights(self) -> list[str]:
        return list(self.engine.spec["refittable_weights"])

    @override
    def set_named_weights(self, name: str, weights: Any, *args: Any) -> bool:
        if name not in self.engine.spec["refittable_weights"]:
            return False
        self.pending[name] = weights.array
        return True

    @override
    def get_missing_weights(self) -> list[str]:
        return []

    @override
    def refit_cuda_engine(self) -> bool:
        self.engine.refit(self.pending)
        return True
