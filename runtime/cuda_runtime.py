"""The CUDA runtime calls the TensorRT backend makes, typed (cuda-python ships no stubs for
``cuda.bindings.runtime``, so mypy checks callers against these signatures instead).

Every ``cudart`` call returns ``(error, *values)``; each wrapper raises ``MordasrError`` naming the
call on an error and returns the value. Device pointers, streams and graphs are plain integers or
opaque handles here, as cuda-python hands them over. ``cuda.bindings.runtime`` is imported lazily
(``pip install cuda-python``; below 13 for CUDA 12, e.g. JetPack 6).
"""

from __future__ import annotations

from typing import Any, NewType

from mordasr.errors import MordasrError
from mordasr.lazy import lazy_import

cudart: Any = lazy_import("cuda.bindings.runtime", "the tensorrt backend")

Stream = NewType("Stream", int)  # cudaStream_t as an integer handle
Graph = NewType("Graph", object)  # cudaGraph_t
GraphExec = NewType("GraphExec", object)  # cudaGraphExec_t


def _check(call: str, result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise MordasrError(f"CUDA error in {call}: {err}")
    return rest[0] if len(rest) == 1 else None


def device_capability(device: int = 0) -> str:
    """Compute capability of a GPU, e.g. ``"8.7"``."""
    props = _check("cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device))
    return f"{props.major}.{props.minor}"


def malloc(nbytes: int) -> int:
    return int(_check("cudaMalloc", cudart.cudaMalloc(nbytes)))


def malloc_host(nbytes: int) -> int:
    """Pinned host memory (copies to and from it run asynchronously)."""
    return int(_check("cudaMallocHost", cudart.cudaMallocHost(nbytes)))


def free(pointer: int) -> None:
    _check("cudaFree", cudart.cudaFree(pointer))


def free_host(pointer: int) -> None:
    _check("cudaFreeHost", cudart.cudaFreeHost(pointer))


def copy_to_device(device: int, host: int, nbytes: int, stream: Stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    _check("cudaMemcpyAsync", cudart.cudaMemcpyAsync(device, host, nbytes, kind, stream))


def copy_to_host(host: int, device: int, nbytes: int, stream: Stream) -> None:
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _check("cudaMemcpyAsync", cudart.cudaMemcpyAsync(host, device, nbytes, kind, stream))


def stream_create() -> Stream:
    return Stream(int(_check("cudaStreamCreate", cudart.cudaStreamCreate())))


def stream_synchronize(stream: Stream) -> None:
    _check("cudaStreamSynchronize", cudart.cudaStreamSynchronize(stream))


def stream_destroy(stream: Stream) -> None:
    _check("cudaStreamDestroy", cudart.cudaStreamDestroy(stream))


def begin_capture(stream: Stream) -> None:
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
    _check("cudaStreamBeginCapture", cudart.cudaStreamBeginCapture(stream, mode))


def end_capture(stream: Stream) -> Graph:
    return Graph(_check("cudaStreamEndCapture", cudart.cudaStreamEndCapture(stream)))


def graph_instantiate(graph: Graph) -> GraphExec:
    return GraphExec(_check("cudaGraphInstantiate", cudart.cudaGraphInstantiate(graph, 0)))


def graph_launch(graph_exec: GraphExec, stream: Stream) -> None:
    _check("cudaGraphLaunch", cudart.cudaGraphLaunch(graph_exec, stream))


def graph_destroy(graph: Graph) -> None:
    _check("cudaGraphDestroy", cudart.cudaGraphDestroy(graph))


def graph_exec_destroy(graph_exec: GraphExec) -> None:
    _check("cudaGraphExecDestroy", cudart.cudaGraphExecDestroy(graph_exec))
