"""Triton model repository: configs valid against Triton's ModelConfig protobuf and the graphs they
serve, and the pipeline model's chain (through a stand-in for the documented parts of Triton's
``triton_python_backend_utils`` that runs each BLS request on the repository's ONNX file)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="needs tritonclient[grpc] (pip install 'mordasr[serve]')")

from mordasr.export.triton import TritonOptions, validate_repository, write_triton_repository  # noqa: E402
from mordasr.export.triton_cli import main as triton_cli  # noqa: E402
from mordasr.runtime.manifest import EngineSpec, load_manifest  # noqa: E402
from mordasr.runtime.pipeline import Restorer  # noqa: E402


@pytest.mark.parametrize("bundle", ["folded_bundle", "gated_bundle"])
def test_repository_is_valid_and_matches_the_graphs(bundle, request, tmp_path):
    bundle_dir = request.getfixturevalue(bundle)
    models = write_triton_repository(bundle_dir, tmp_path / "repo")
    manifest = load_manifest(bundle_dir)
    assert len(models) == len(manifest.graphs) + 1 and "mordasr" in models
    assert validate_repository(tmp_path / "repo") == []
    config = (tmp_path / "repo" / "mordasr_unet" / "config.pbtxt") if manifest.mode == "gated" else \
        (tmp_path / "repo" / "mordasr_unet_b1" / "config.pbtxt")
    text = config.read_text()
    # never more than the runtime sends: the bundle's max_batch (1), the router 4 windows an image
    assert manifest.max_batch == 1 and "max_batch_size: 1" in text and "dynamic_batching" not in text
    assert "dims: [ 8, -1, -1 ]" in text
    router = (tmp_path / "repo" / "mordasr_router" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in router and "dynamic_batching" in router
    pipeline = json.loads((tmp_path / "repo" / "mordasr" / "1" / "pipeline.json").read_text())
    assert set(pipeline["models"]) == {g.key for g in manifest.graphs}
    assert not list(tmp_path.glob(".*partial"))


def test_repository_batches_what_the_bundle_was_exported_for(folded_bundle, tmp_path):
    from dataclasses import replace

    bundle = tmp_path / "b"
    shutil.copytree(folded_bundle, bundle)
    replace(load_manifest(bundle), max_batch=4).write(bundle)
    write_triton_repository(bundle, tmp_path / "repo")
    unet = (tmp_path / "repo" / "mordasr_unet_b1" / "config.pbtxt").read_text()
    router = (tmp_path / "repo" / "mordasr_router" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in unet and "dynamic_batching" in unet
    assert "max_batch_size: 16" in router  # 4 windows for each of 4 images


def test_validation_finds_what_triton_would_refuse(folded_bundle, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repository(folded_bundle, repo)
    unet = repo / "mordasr_unet_b0" / "config.pbtxt"
    unet.write_text(unet.read_text().replace("dims: [ 8, -1, -1 ]", "dims: [ 4, -1, -1 ]", 1))
    router = repo / "mordasr_router" / "config.pbtxt"
    router.write_text(router.read_text().replace("TYPE_FP32", "TYPE_INT64", 1))
    decoder = repo / "mordasr_decoder" / "config.pbtxt"
    decoder.write_text(decoder.read_text() + "no_such_field: 1\n")
    (repo / "mordasr_encoder_b1" / "1" / "model.onnx").unlink()
    shutil.rmtree(repo / "mordasr_encoder_b0")
    problems = "\n".join(validate_repository(repo))
    assert "mordasr_unet_b0/config.pbtxt: input latent: dims [4, -1, -1], graph has [8, -1, -1]" in problems
    assert "mordasr_router/config.pbtxt: input image: data_type TYPE_INT64, graph has TYPE_FP32" in problems
    assert "mordasr_decoder/config.pbtxt: not a valid Triton ModelConfig" in problems
    assert "missing mordasr_encoder_b1/1/model.onnx" in problems
    assert "pipeline calls model 'mordasr_encoder_b0', which the repository lacks" in problems


def test_engine_repository_uses_tensorrt_plans(folded_bundle, tmp_path):
    """Config logic only: the plan files are placeholders, never loaded (no TensorRT here)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(folded_bundle, bundle)
    manifest = replace(load_manifest(bundle), max_batch=4)
    engines = []
    for g in manifest.graphs:
        file = f"engines/{g.key}.sm87.trt10.3.0.fp32.plan"
        (bundle / "engines").mkdir(exist_ok=True)
        (bundle / file).write_bytes(b"placeholder")
        profile = {t.name: [[1, *[1 if isinstance(d, str) else d for d in t.shape[1:]]]] * 2 +
                   [[4, *[8 if isinstance(d, str) else d for d in t.shape[1:]]]] for t in g.inputs}
        engines.append(EngineSpec(g.key, file, "0" * 64, "8.7", "10.3.0", "fp32", profile))
    replace(manifest, engines=engines).write(bundle)
    with pytest.raises(Exception, match="TensorRT engines run on a GPU"):
        write_triton_repository(bundle, tmp_path / "cpu", TritonOptions(kind="cpu", engines=True))
    write_triton_repository(bundle, tmp_path / "repo", TritonOptions(engines=True))
    text = (tmp_path / "repo" / "mordasr_unet_b0" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and "max_batch_size: 4" in text and "KIND_GPU" in text
    assert (tmp_path / "repo" / "mordasr_unet_b0" / "1" / "model.plan").read_bytes() == b"placeholder"
    assert validate_repository(tmp_path / "repo") == []
    router = (tmp_path / "repo" / "mordasr_router" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in router  # the engine's profile, below the 16 windows of 4 images
    pipeline = json.loads((tmp_path / "repo" / "mordasr" / "1" / "pipeline.json").read_text())
    assert pipeline["max_batch_size"] == 1  # so the pipeline sends one image (4 windows) at a time
    with pytest.raises(Exception, match="no fp32 engine for"):
        replace(manifest, engines=engines[1:]).write(bundle)
        write_triton_repository(bundle, tmp_path / "repo2", TritonOptions(engines=True))
    assert not (tmp_path / "repo2").exists()


def _stand_in_pb_utils(repo):
    """The calls of Triton's Python-backend API that the pipeline model makes, served by ONNX
    Runtime sessions on the repository's model files. It checks each BLS request against the
    called model's config (declared inputs, batch limit), as Triton would."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    pb = types.ModuleType("triton_python_backend_utils")
    sessions, configs, calls = {}, {}, []
    pb.TRITONSERVER_MEMORY_CPU = 0

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._tensors, self._error = output_tensors, error

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error

        def output_tensors(self):
            return self._tensors

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            if self.model_name not in configs:
                configs[self.model_name] = text_format.Parse(
                    (repo / self.model_name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
                sessions[self.model_name] = ort.InferenceSession(str(repo / self.model_name / "1" / "model.onnx"))
            config = configs[self.model_name]
            declared = {t.name for t in config.input}
            feeds = {t.name(): t.as_numpy() for t in self.inputs}
            if set(feeds) != declared:
                return InferenceResponse([], TritonError(f"inputs {sorted(feeds)} != declared {sorted(declared)}"))
            batch = next(iter(feeds.values())).shape[0]
            if config.max_batch_size and batch > config.max_batch_size:
                return InferenceResponse([], TritonError(f"batch {batch} > max_batch_size"))
            calls.append((self.model_name, batch))
            values = sessions[self.model_name].run(self.outputs, feeds)
            return InferenceResponse([Tensor(n, v) for n, v in zip(self.outputs, values)])

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = (Tensor, TritonError,
                                                                            InferenceResponse, InferenceRequest)
    pb.PreferredMemory = lambda kind, device=0: (kind, device)
    pb.get_input_tensor_by_name = lambda request, name: next(t for t in request.inputs if t.name() == name)
    pb.get_output_tensor_by_name = lambda response, name: next(t for t in response.output_tensors()
                                                               if t.name() == name)
    pb.calls = calls
    return pb


@pytest.mark.parametrize("bundle", ["folded_bundle", "gated_bundle"])
def test_pipeline_model_equals_mordasr_run(bundle, request, tmp_path, monkeypatch):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(bundle), bundle_dir)
    replace(load_manifest(bundle_dir), max_batch=4).write(bundle_dir)  # exported for batches of 4
    repo = tmp_path / "repo"
    write_triton_repository(bundle_dir, repo, TritonOptions(max_batch_size=2))
    pb = _stand_in_pb_utils(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("mordasr_triton_model", repo / "mordasr" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "mordasr"), "model_version": "1", "model_config": "{}"})

    rng = np.random.default_rng(3)
    images = [rng.random((16, 16, 3), dtype=np.float32) for _ in range(3)]
    images.append(rng.random((12, 20, 3), dtype=np.float32))
    requests = [types.SimpleNamespace(inputs=[pb.Tensor("image", im)]) for im in images]
    requests.insert(2, types.SimpleNamespace(inputs=[pb.Tensor("image", np.zeros((4, 4), np.float32))]))
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert responses[2].has_error() and "(H, W, 3)" in responses[2].error().message()
    good = [r for i, r in enumerate(responses) if i != 2]
    reference = Restorer(bundle_dir)
    for image, response in zip(images, good):
        assert not response.has_error()
        expected = reference.restore(image)
        restored = pb.get_output_tensor_by_name(response, "restored").as_numpy()
        assert restored.shape == expected.image.shape
        np.testing.assert_allclose(restored, expected.image, atol=1e-5)
        np.testing.assert_allclose(pb.get_output_tensor_by_name(response, "scores").as_numpy(), expected.scores,
                                   atol=1e-5)
        bucket = int(pb.get_output_tensor_by_name(response, "bucket").as_numpy()[0])
        assert bucket == (-1 if expected.bucket is None else expected.bucket)
    # same-size images were batched, never past the models' limit of 2 images
    assert max(batch for _, batch in pb.calls) == 2


def test_triton_cli(folded_bundle, tmp_path):
    runner = CliRunner()
    result = runner.invoke(triton_cli, [str(folded_bundle), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output
    assert "valid Triton ModelConfig" in result.output
    again = runner.invoke(triton_cli, [str(folded_bundle), "-o", str(tmp_path / "repo")])
    assert again.exit_code == 2 and "already exists" in again.output
    (tmp_path / "repo" / "mordasr_decoder" / "config.pbtxt").write_text('name: "other"\nbackend: "onnxruntime"\n')
    check = runner.invoke(triton_cli, [str(folded_bundle), "-o", str(tmp_path / "repo"), "--check"])
    assert check.exit_code == 1 and "differs from its folder" in check.output
    missing = runner.invoke(triton_cli, [str(tmp_path / "nope"), "-o", str(tmp_path / "r2")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
