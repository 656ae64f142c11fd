"""A Triton Inference Server model repository from a bundle.

One model per graph (``onnxruntime`` backend for ONNX graphs, ``tensorrt_plan`` for engines the
bundle has built), named ``mordasr_<component>[_b<bucket>][_fp32]``, each with dynamic batching
over its batch dimension; and the Python-backend model ``mordasr`` that runs the chain router ->
bucket -> encoder -> UNet -> x0 step -> decoder over them (``triton_pipeline.py``).
``validate_repository`` parses every ``config.pbtxt`` with Triton's own ModelConfig protobuf
(from ``tritonclient``) and checks it against the files it serves.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime.atomic import atomic_directory, atomic_write
from mordasr.runtime.manifest import GraphSpec, Manifest, load_manifest
from mordasr.runtime.trt_settings import graph_batch

PIPELINE_MODEL = "mordasr"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 2: "TYPE_UINT8", 3: "TYPE_INT8",
              9: "TYPE_BOOL"}  # onnx.TensorProto element type -> Triton data type
MODEL_FILES = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "python": "model.py"}


@dataclass(frozen=True)
class TritonOptions:
    kind: str = "auto"  # instance kind: auto (GPU when the model can use one) | cpu | gpu
    instances: int = 1  # instances of each component model
    max_batch_size: int = 8
    queue_delay_us: int = 2000  # dynamic batching: how long to wait to fill a batch
    engines: bool = False  # serve the bundle's TensorRT engines instead of its ONNX graphs

    def validate(self) -> None:
        if self.kind not in ("auto", "cpu", "gpu"):
            raise MordasrError(f"unknown instance kind {self.kind!r}; choose auto, cpu or gpu")
        if self.instances < 1 or self.max_batch_size < 1 or self.queue_delay_us < 0:
            raise MordasrError("instances and max batch size must be >= 1, queue delay >= 0")


def model_name(graph: GraphSpec) -> str:
    name = f"{PIPELINE_MODEL}_{graph.component}"
    if graph.bucket is not None:
        name += f"_b{graph.bucket}"
    return name + ("_fp32" if graph.fallback else "")


def _dims(shape: list[int | str], batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensor_block(kind: str, tensors, batched: bool) -> str:
    rows = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES:
            raise BundleError(f"tensor {t.name} has dtype {t.dtype}, which Triton's configs cannot state")
        dims = ", ".join(str(d) for d in _dims(t.shape, batched))
        rows.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _engine_for(manifest: Manifest, graph: GraphSpec):
    for engine in manifest.engines:
        if engine.graph == graph.key and engine.precision == graph.precision:
            return engine
    return None


def windows_per_image(manifest: Manifest, graph: GraphSpec) -> int:
    """Batch entries one image puts into ``graph``: the router's windows, else 1."""
    return graph_batch(manifest, graph)[2] // manifest.max_batch


def component_config(manifest: Manifest, graph: GraphSpec, options: TritonOptions) -> tuple[str, str, int]:
    """(config.pbtxt text, model file to copy, max batch size: 0 when not batched) for one graph."""
    name = model_name(graph)
    engine = _engine_for(manifest, graph) if options.engines else None
    if options.engines and engine is None:
        raise BundleError(f"the bundle has no {graph.precision} engine for {graph.key}; build them "
                          "(build_engines.sh, or mordasr-export --engines) and write the repository again")
    # never more than the runtime sends the graph: up to --max-batch-size images (at most the
    # bundle's max_batch), and the router 4 windows per image; an engine's profile may take fewer
    max_batch = windows_per_image(manifest, graph) * min(options.max_batch_size, manifest.max_batch)
    batched = all(isinstance(t.shape[0], str) for t in graph.inputs + graph.outputs)
    if engine is not None:
        # Triton batches an engine only within its optimization profile's batch range
        max_batch = min(max_batch, min(shapes[2][0] for shapes in engine.profile.values()))
        batched = batched and min(shapes[0][0] for shapes in engine.profile.values()) == 1
    kind = "KIND_GPU" if options.kind == "gpu" or (options.kind == "auto" and engine is not None) else "KIND_CPU"
    if engine is not None and kind == "KIND_CPU":
        raise MordasrError("TensorRT engines run on a GPU: use instance kind gpu or auto")
    lines = [f'name: "{name}"']
    if engine is not None:
        lines += ['platform: "tensorrt_plan"']
    else:
        lines += ['backend: "onnxruntime"']
    max_batch = max_batch if batched else 0
    lines.append(f"max_batch_size: {max_batch}")
    text = "\n".join(lines) + "\n"
    text += _tensor_block("input", graph.inputs, max_batch > 0)
    text += _tensor_block("output", graph.outputs, max_batch > 0)
    if max_batch > 1:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {options.queue_delay_us}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {options.instances}\n    kind: {kind}\n  }}\n]\n"
    return text, engine.file if engine is not None else graph.file, max_batch


def pipeline_config(manifest: Manifest, kind: str) -> str:
    d = len(manifest.degradations)
    return (f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [\n  {\n    name: "image"\n    data_type: TYPE_FP32\n    dims: [ -1, -1, 3 ]\n  }\n]\n'
            'output [\n  {\n    name: "restored"\n    data_type: TYPE_FP32\n    dims: [ -1, -1, 3 ]\n  },\n'
            f'  {{\n    name: "scores"\n    data_type: TYPE_FP32\n    dims: [ {d} ]\n  }},\n'
            '  {\n    name: "bucket"\n    data_type: TYPE_INT32\n    dims: [ 1 ]\n  }\n]\n'
            f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n")


def write_triton_repository(bundle_dir: str | Path, repo_dir: str | Path, options: TritonOptions = TritonOptions(),
                            tiling: dict | None = None, force: bool = False) -> list[str]:
    """Write the repository; returns the model names. Built beside ``repo_dir`` and renamed
    into place, so a failure leaves no half-written repository."""
    options.validate()
    bundle_dir, repo_dir = Path(bundle_dir), Path(repo_dir)
    manifest = load_manifest(bundle_dir)
    if repo_dir.exists() and not force:
        raise MordasrError(f"{repo_dir} already exists (pass --force to replace it)")
    with atomic_directory(repo_dir) as staging:
        models, batch_limits = {}, []
        for graph in manifest.graphs:
            text, file, max_batch = component_config(manifest, graph, options)
            batch_limits.append(max(1, max_batch // windows_per_image(manifest, graph)))  # images per call
            name = model_name(graph)
            version = staging / name / "1"
            version.mkdir(parents=True)
            suffix = ".plan" if file.endswith(".plan") else ".onnx"
            shutil.copyfile(bundle_dir / file, version / f"model{suffix}")
            if graph.external_data and suffix == ".onnx":
                # the graph names its weights file by this relative name
                shutil.copyfile(bundle_dir / graph.external_data, version / Path(graph.external_data).name)
            atomic_write(staging / name / "config.pbtxt", text)
            models[graph.key] = name
        pipeline = staging / PIPELINE_MODEL / "1"
        pipeline.mkdir(parents=True)
        shutil.copyfile(Path(__file__).with_name("triton_pipeline.py"), pipeline / "model.py")
        shutil.copyfile(bundle_dir / "manifest.json", pipeline / "manifest.json")
        atomic_write(pipeline / "pipeline.json", json.dumps({"models": models, "tiling": tiling or {},
                                                             "max_batch_size": min(batch_limits)}, indent=2) + "\n")
        kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"  # the chain's own work is host-side
        atomic_write(staging / PIPELINE_MODEL / "config.pbtxt", pipeline_config(manifest, kind))
        atomic_write(staging / "README.md", _readme(manifest, models))
    return sorted(set(models.values())) + [PIPELINE_MODEL]


def _readme(manifest: Manifest, models: dict[str, str]) -> str:
    rows = "\n".join(f"| `{name}` | {key} |" for key, name in models.items())
    return f"""# mordasr Triton model repository

{manifest.preset} {manifest.mode} bundle ({manifest.precision}), x{manifest.scale}.

| model | graph |
|---|---|
{rows}
| `{PIPELINE_MODEL}` | the whole chain (Python backend, BLS over the models above) |

Start Triton on it (the Python backend needs mordasr's torch-free runtime in its environment):

    docker run --gpus all --rm -p8000:8000 -p8001:8001 -v $PWD:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
        bash -c "pip install 'mordasr[runtime]' && tritonserver --model-repository=/models"

Then send `image` (FP32, H x W x 3 in [0, 1]) to model `{PIPELINE_MODEL}`; it answers `restored`,
`scores` and `bucket`. The component models can be called on their own as well.
"""


def validate_repository(repo_dir: str | Path) -> list[str]:
    """Check every model of a repository; returns the problems found (empty: valid).

    Each ``config.pbtxt`` must parse as Triton's ``ModelConfig`` (unknown fields and bad enum
    values fail), name its folder, have the backend's default model file in version 1, state
    batching consistently, and for ONNX models declare exactly the graph's inputs and outputs
    with its element types and dims. The pipeline's model map must name models that exist.
    """
    from mordasr.lazy import import_optional

    model_config_pb2 = import_optional("tritonclient.grpc.model_config_pb2", "validating a Triton repository")
    from google.protobuf import text_format  # tritonclient's own dependency
    repo_dir = Path(repo_dir)
    problems: list[str] = []
    configs = sorted(repo_dir.glob("*/config.pbtxt"))
    if not configs:
        return [f"{repo_dir}: no model folders with a config.pbtxt"]
    names = {c.parent.name for c in configs}
    for path in configs:
        where = f"{path.parent.name}/config.pbtxt"
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as err:
            problems.append(f"{where}: not a valid Triton ModelConfig ({err})")
            continue
        problems += [f"{where}: {p}" for p in _check_model(config, path.parent, model_config_pb2)]
        if config.backend == "python":
            models = json.loads((path.parent / "1" / "pipeline.json").read_text())["models"]
            problems += [f"{where}: pipeline calls model {m!r}, which the repository lacks"
                         for m in sorted(set(models.values()) - names)]
    return problems


def _check_model(config, folder: Path, pb) -> list[str]:
    problems = []
    if config.name != folder.name:
        problems.append(f"name {config.name!r} differs from its folder {folder.name!r}")
    backend = "tensorrt" if config.platform == "tensorrt_plan" else config.backend
    if backend not in MODEL_FILES:
        return problems + [f"unknown backend {config.backend!r} / platform {config.platform!r}"]
    model_file = folder / "1" / MODEL_FILES[backend]
    if not model_file.is_file():
        problems.append(f"missing {model_file.relative_to(folder.parent)}")
    if config.max_batch_size < 0:
        problems.append("max_batch_size must be >= 0")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    for group in config.instance_group:
        if group.count < 1:
            problems.append("instance_group count must be >= 1")
        if backend == "tensorrt" and group.kind == pb.ModelInstanceGroup.KIND_CPU:
            problems.append("a TensorRT plan cannot run on KIND_CPU instances")
    for tensor in list(config.input) + list(config.output):
        if not tensor.dims or any(d < -1 or d == 0 for d in tensor.dims):
            problems.append(f"tensor {tensor.name}: dims {list(tensor.dims)} (each > 0 or -1)")
    if backend == "onnxruntime" and model_file.is_file():
        problems += _check_against_onnx(config, model_file, pb)
    return problems


def _check_against_onnx(config, model_file: Path, pb) -> list[str]:
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    declared = {"input": {t.name: t for t in config.input}, "output": {t.name: t for t in config.output}}
    actual = {"input": [v for v in graph.input if v.name not in initializers], "output": list(graph.output)}
    problems = []
    for kind in ("input", "output"):
        names = {v.name for v in actual[kind]}
        for extra in sorted(set(declared[kind]) - names):
            problems.append(f"{kind} {extra!r} is not a graph {kind}")
        for value in actual[kind]:
            tensor = declared[kind].get(value.name)
            if tensor is None:
                problems.append(f"graph {kind} {value.name!r} is not declared")
                continue
            ttype = value.type.tensor_type
            want = ONNX_TYPES.get(ttype.elem_type)
            if pb.DataType.Name(tensor.data_type) != want:
                problems.append(f"{kind} {value.name}: data_type {pb.DataType.Name(tensor.data_type)}, "
                                f"graph has {want}")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    problems.append(f"{kind} {value.name}: batching needs a dynamic first dim, graph has {dims}")
                dims = dims[1:]
            if list(tensor.dims) != dims:
                problems.append(f"{kind} {value.name}: dims {list(tensor.dims)}, graph has {dims}")
    return problems
