"""The ``tensorrt`` backend driven through a stand-in of TensorRT's runtime API
(``tests/tensorrt_standin.py``: profiles enforced, refit refused on engines not built refittable,
failed enqueues reported), with the shapes a real photograph makes: several router windows, a
batch of two, tiles, an image below the profile's minimum. The stand-in engines run the bundle's
ONNX graphs, so every restore must equal ONNX Runtime's."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest

from mordasr.errors import BundleError, MordasrError
from mordasr.runtime import Restorer, load_manifest
from mordasr.runtime.engine_names import engine_file_name
from mordasr.runtime.routing import MAX_WINDOWS, router_windows
from mordasr.runtime.tiling import Tiling
from mordasr.runtime.trt_build import pack_names
from mordasr.runtime.trt_settings import EngineOptions, engine_graphs, graph_refittable, profile_shapes
from mordasr.tests import tensorrt_standin as standin

SIZES = {"min": [64, 64], "opt": [128, 128], "max": [256, 256]}  # output px: LR 16 .. 64, tiles of 64


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """The backend's ``tensorrt`` and CUDA calls replaced by the stand-in."""
    import mordasr.runtime.backends.tensorrt as backend
    from mordasr.runtime import cuda_runtime

    cuda = standin.StandinCuda()
    monkeypatch.setattr(standin, "CUDA", cuda)
    monkeypatch.setattr(backend, "trt", standin)
    for name in ("device_capability", "malloc", "malloc_host", "free", "free_host", "copy_to_device",
                 "copy_to_host", "stream_create", "stream_synchronize", "stream_destroy", "begin_capture",
                 "end_capture", "graph_instantiate", "graph_launch", "graph_destroy", "graph_exec_destroy"):
        monkeypatch.setattr(cuda_runtime, name, getattr(cuda, name))
    return cuda


@pytest.fixture(scope="module")
def batch2_bundle(tiny_model, tiny_buckets, tmp_path_factory):
    """A folded bundle whose profiles take 64..256 px outputs and batches of two images."""
    from mordasr.export.bundle import export_bundle

    path = tmp_path_factory.mktemp("trt") / "folded-b2"
    export_bundle(tiny_model, path, "folded", tiny_buckets, profile=SIZES, max_batch=2)
    return path


def build_standin_engines(bundle, options: EngineOptions, old_batch_profiles: bool = False) -> list[str]:
    """Write the engines build_engines.sh would build (stand-in plans), and record the options.
    ``old_batch_profiles``: the profiles before this change, batch 1 for every graph."""
    manifest = load_manifest(bundle)
    replace(manifest, engine_options=options.to_dict()).write(bundle)
    written = []
    for graph in engine_graphs(manifest, options.refittable):
        profile = profile_shapes(manifest, graph, options.min_size, options.opt_size, options.max_size)
        if old_batch_profiles:
            profile = {name: [[1, *s[1:]] for s in shapes] for name, shapes in profile.items()}
        refittable = graph_refittable(manifest, graph, options.refittable)
        plan = standin.standin_plan(bundle / graph.file, profile, pack_names(bundle, manifest, graph), refittable)
        file = bundle / engine_file_name(graph, "8.7", standin.__version__)
        file.parent.mkdir(exist_ok=True)
        file.write_bytes(plan)
        written.append(graph.key)
    return written


def _copy(bundle, tmp_path, name="b"):
    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An LR photograph: scikit-image's held-out astronaut, degraded and cropped."""
    from mordasr.data.samples import load_sample_image

    image = load_sample_image("astronaut")[::2, ::2]
    y, x = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    noise = np.random.default_rng(seed).normal(0, 0.02, (height, width, 3)).astype(np.float32)
    return np.clip(image[y:y + height, x:x + width] + noise, 0, 1)


OPTIONS = EngineOptions(min_size="64", opt_size="128", max_size="256")


def test_a_photograph_runs_on_the_engines_as_exported(batch2_bundle, tmp_path, fake_tensorrt):
    """A 150x200 LR photograph: four router windows, then tiles of 64 LR px. With the profiles
    build_engines.sh writes, the engines take it and give ONNX Runtime's output."""
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)
    image = _photo(150, 200)
    assert len(router_windows(150, 200, 64)) == MAX_WINDOWS
    with Restorer(bundle) as reference, Restorer(bundle, backend="tensorrt") as engines:
        expected, got = reference.restore(image), engines.restore(image)
        assert engines.is_tiled(image)
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
        assert got.bucket == expected.bucket
        np.testing.assert_allclose(got.image, expected.image, atol=1e-5)
        assert fake_tensorrt.graph_launches > 0  # tiles of one shape replay the captured graph


def test_the_batch_1_profiles_of_before_refuse_a_photograph_with_the_right_advice(batch2_bundle, tmp_path,
                                                                                  fake_tensorrt):
    """What the first user with a GPU hit: every profile took batch 1, the router gets 4 windows."""
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS, old_batch_profiles=True)
    with Restorer(bundle, backend="tensorrt") as engines:
        with pytest.raises(BundleError, match=r"router: input image of shape \(4, 3, 64, 64\) is outside the "
                                              r"engine's profile .*a batch of 4, the engine takes 1"):
            engines.restore(_photo(150, 200))


def test_restore_batch_splits_at_the_bundles_max_batch(batch2_bundle, tmp_path, fake_tensorrt):
    """Nine same-size images (one router window each): the router takes 8 windows a call, the
    graphs 2 images (the bundle's max_batch); all as ONNX Runtime restores them one by one."""
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)
    images = [_photo(64, 64, seed) for seed in range(9)]
    seen = []
    tap = lambda graph, feeds, out: seen.append((graph.component, len(out)))  # noqa: E731
    with Restorer(bundle, backend="tensorrt", tap=tap) as trt, Restorer(bundle) as reference:
        results = trt.restore_batch(images)
        for image, result in zip(images, results):
            np.testing.assert_allclose(result.image, reference.restore(image).image, atol=1e-5)
    router_calls = [n for c, n in seen if c == "router"]
    assert router_calls == [8, 1]
    assert sorted(n for c, n in seen if c == "encoder") == [1, 2, 2, 2, 2]


def test_an_image_below_the_profile_minimum_is_padded_up_to_it(batch2_bundle, tmp_path, fake_tensorrt):
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)
    image = _photo(10, 13)
    with Restorer(bundle, backend="tensorrt") as trt:
        assert trt.backend.min_input == (16, 16)
        restored = trt.restore(image)
    assert restored.image.shape == (40, 52, 3) and np.isfinite(restored.image).all()


def test_an_image_past_the_largest_profile_without_tiles_says_to_tile(batch2_bundle, tmp_path, fake_tensorrt):
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)
    with Restorer(bundle, backend="tensorrt") as trt:
        with pytest.raises(BundleError, match=r"larger than its largest size; tile smaller \(--tile\)"):
            trt.restore(_photo(96, 96), tiling=Tiling(tile=0))


def test_refit_switches_buckets_on_refittable_engines(batch2_bundle, tmp_path, fake_tensorrt):
    bundle = _copy(batch2_bundle, tmp_path)
    options = replace(OPTIONS, refittable=True)
    built = build_standin_engines(bundle, options)
    assert built == ["router", "encoder.b0", "unet.b0", "decoder"]  # other buckets by refit
    image = _photo(48, 48)
    with Restorer(bundle, backend="tensorrt", bucket_switch="refit") as trt, Restorer(bundle) as reference:
        for bucket in (1, 0, 1):
            np.testing.assert_allclose(trt.restore(image, bucket=bucket).image,
                                       reference.restore(image, bucket=bucket).image, atol=1e-5)
        assert not trt.backend.refit_refused


def test_refit_on_engines_built_without_it_falls_back_to_one_engine_per_bucket(batch2_bundle, tmp_path,
                                                                              fake_tensorrt, caplog):
    """The Orin profile says refit; engines built without --refittable cannot: the backend checks
    engine.refittable before refitting (a Refitter on such an engine fails in TensorRT)."""
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)  # every bucket's engines, none refittable
    image = _photo(48, 48)
    with caplog.at_level(logging.WARNING, logger="mordasr.runtime"), \
            Restorer(bundle, backend="tensorrt", bucket_switch="refit") as trt, Restorer(bundle) as reference:
        for bucket in (1, 0):
            np.testing.assert_allclose(trt.restore(image, bucket=bucket).image,
                                       reference.restore(image, bucket=bucket).image, atol=1e-5)
        assert trt.backend.refit_refused == {"encoder", "unet"}
    assert "was not built refittable" in caplog.text and "one engine per bucket" in caplog.text


def test_the_standin_enforces_what_tensorrt_does(batch2_bundle):
    manifest = load_manifest(batch2_bundle)
    graph = manifest.graph("unet", 0)
    profile = profile_shapes(manifest, graph, "64", "128", "256")
    engine = standin.Runtime(standin.Logger()).deserialize_cuda_engine(
        standin.standin_plan(batch2_bundle / graph.file, profile))
    context = engine.create_execution_context()
    assert not context.set_input_shape("latent", (3, 8, 32, 32))  # batch past the profile's 2
    assert not context.execute_async_v3(1)  # no input shape set
    assert context.set_input_shape("latent", (2, 8, 32, 32))
    assert not context.execute_async_v3(1)  # no addresses set
    with pytest.raises(TypeError):
        standin.Refitter(engine, standin.Logger())  # not built refittable
    assert standin.Runtime(standin.Logger()).deserialize_cuda_engine(b"garbage") is None


def test_a_failed_enqueue_is_an_error_not_a_captured_graph(batch2_bundle, tmp_path, fake_tensorrt, monkeypatch):
    bundle = _copy(batch2_bundle, tmp_path)
    build_standin_engines(bundle, OPTIONS)
    calls = {"n": 0}
    real = standin.IExecutionContext.execute_async_v3

    def fails_while_captured(self, stream_handle):
        calls["n"] += 1
        return False if fake_tensorrt.capturing is not None else real(self, stream_handle)

    monkeypatch.setattr(standin.IExecutionContext, "execute_async_v3", fails_while_captured)
    with Restorer(bundle, backend="tensorrt") as trt:
        with pytest.raises(MordasrError, match="execution failed while capturing a CUDA graph"):
            trt.restore(_photo(32, 32))
    assert fake_tensorrt.graph_launches == 0
