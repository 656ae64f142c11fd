"""The torch-free runtime: manifest checks, routing, and the whole pipeline against PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mordasr.errors import BundleError, ImageError
from mordasr.runtime import Restorer, load_manifest
from mordasr.runtime.images import resize
from mordasr.runtime.routing import nearest_bucket, router_windows
from mordasr.runtime.tiling import Tiling


def _torch_restore(model, image, scores):
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)[None]))
    with torch.no_grad():
        return model(x, torch.as_tensor(scores, dtype=torch.float32).reshape(1, -1))[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["folded", "gated"])
def test_restorer_matches_pytorch(mode, tiny_model, folded_bundle, gated_bundle, rng):
    bundle = folded_bundle if mode == "folded" else gated_bundle
    restorer = Restorer(bundle)
    image = rng.uniform(0, 1, (12, 16, 3)).astype(np.float32)  # sides multiples of lr_multiple (4)
    result = restorer.restore(image)
    assert result.image.shape == (48, 64, 3)
    size = tiny_model.config.router_image_size
    view = torch.from_numpy(resize(image, size, size).clip(0, 1).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        assert np.abs(tiny_model.estimator(view)[0].numpy() - result.scores).max() < 1e-5
    if mode == "folded":
        assert result.bucket == int(nearest_bucket(result.scores, restorer.centres)[0])
        route = restorer.manifest.buckets[result.bucket].centre
    else:
        assert result.bucket is None
        route = result.scores
    assert np.abs(result.image - _torch_restore(tiny_model, image, route)).max() < 1e-4


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (2, 3), (9, 4)])
def test_odd_sizes_are_padded_and_cropped(shape, folded_bundle, rng):
    image = rng.uniform(0, 1, shape + (3,)).astype(np.float32)
    result = Restorer(folded_bundle).restore(image)
    assert result.image.shape == (shape[0] * 4, shape[1] * 4, 3)
    assert np.isfinite(result.image).all() and result.image.min() >= 0 and result.image.max() <= 1


def test_restore_rejects_wrong_layout(folded_bundle):
    with pytest.raises(ImageError, match="expected an"):
        Restorer(folded_bundle).restore(np.zeros((4, 4), np.float32))
    with pytest.raises(ImageError, match="float image in .0, 1. or a uint8 one, got int32"):
        Restorer(folded_bundle).restore(np.zeros((4, 4, 3), np.int32))


@pytest.mark.parametrize("tile", [0, 16])
def test_uint8_pixels_restore_exactly_like_their_float_decoding(tile, folded_bundle, rng):
    """8-bit images are held as decoded (3 bytes a pixel) and converted a tile or a router window
    at a time: the result equals the restore of the whole image converted first, bit for bit."""
    from mordasr.runtime.images import as_float

    pixels = rng.integers(0, 256, (70, 45, 3), dtype=np.uint8)  # router: one 64 px window
    small = pixels[:30, :20]  # router: the image resized
    restorer = Restorer(folded_bundle)
    tiling = Tiling(tile=tile, overlap=4)
    for image in (pixels, small):
        from_bytes = restorer.restore(image, tiling=tiling)
        from_floats = restorer.restore(as_float(image), tiling=tiling)
        assert np.array_equal(from_bytes.image, from_floats.image) and from_bytes.bucket == from_floats.bucket
        assert np.array_equal(from_bytes.scores, from_floats.scores)
    assert np.array_equal(as_float(pixels), pixels.astype(np.float32) / 255.0)


def test_nearest_bucket():
    centres = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert nearest_bucket(np.array([[0.2, 0.1], [0.9, 0.6]]), centres).tolist() == [0, 1]


@settings(max_examples=300, deadline=None)
@given(height=st.integers(1, 600), width=st.integers(1, 600), size=st.sampled_from([16, 63, 64, 224]))
def test_router_windows_lie_inside_the_image_without_overlap(height, width, size):
    windows = router_windows(height, width, size)
    if min(height, width) < size:
        assert windows is None
        return
    for y, x in windows:
        assert 0 <= y <= height - size and 0 <= x <= width - size
    for length, starts in ((height, sorted({y for y, _ in windows})), (width, sorted({x for _, x in windows}))):
        assert len(starts) == (2 if length >= 2 * size else 1)  # two windows where the axis holds two
        assert len(starts) == 1 or starts[1] - starts[0] >= size
    assert len(windows) == len({y for y, _ in windows}) * len({x for _, x in windows})


@pytest.mark.parametrize("shape", [(64, 90), (130, 140), (70, 200)])
def test_router_scores_native_windows_like_pytorch(shape, tiny_model, folded_bundle, rng):
    """An image at least the router's size on both sides is scored through native-resolution
    windows whose scores are averaged, the same way in the runtime and in PyTorch."""
    image = rng.uniform(0, 1, shape + (3,)).astype(np.float32)
    got = Restorer(folded_bundle).scores(image)
    with torch.no_grad():
        expected = tiny_model.estimate(torch.from_numpy(image.transpose(2, 0, 1)[None].copy()))[0].numpy()
    assert np.abs(got - expected).max() < 1e-5


def _copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_manifest_refuses_tampered_or_incomplete_bundles(folded_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a mordasr bundle"):
        load_manifest(tmp_path)
    bundle = _copy(folded_bundle, tmp_path)
    with open(bundle / "unet.b1.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="unet.b1.onnx does not match its sha256.*re-export"):
        load_manifest(bundle)
    (bundle / "unet.b1.onnx").unlink()
    with pytest.raises(BundleError, match="unet.b1.onnx is missing"):
        load_manifest(bundle)


def test_manifest_schema_and_json_errors(folded_bundle, tmp_path):
    bundle = _copy(folded_bundle, tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema 99.*re-export"):
        load_manifest(bundle)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_manifest(bundle)
    data["schema_version"] = 1
    del data["graphs"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="malformed manifest"):
        load_manifest(bundle)


def test_runtime_never_imports_torch(gated_bundle, folded_bundle):
    code = (
        "import sys, numpy as np\n"
        "from mordasr.runtime import Restorer\n"
        "from mordasr.runtime.cli import main\n"
        "import mordasr.runtime.backends.tensorrt, mordasr.runtime.compare, mordasr.runtime.jobs\n"
        "import mordasr.runtime.backends.triton, mordasr.serving.requests\n"
        f"r = Restorer({str(gated_bundle)!r})\n"
        "out = r.restore(np.random.rand(8, 10, 3).astype(np.float32))\n"
        "assert out.image.shape == (32, 40, 3)\n"
        f"r = Restorer({str(folded_bundle)!r}, bucket_switch='refit')\n"
        "out = r.restore(np.random.rand(8, 10, 3).astype(np.float32), bucket=1)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'open_clip'))\n"
        "print('LOADED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout


@pytest.mark.parametrize("bundle", ["folded_bundle", "gated_bundle"])
def test_restore_batch_equals_one_by_one(bundle, request, rng):
    """A server's batch: same-size, same-bucket images share graph calls, others run alone,
    images past the tile run tiled; every result equals restore() on its own."""
    restorer = Restorer(request.getfixturevalue(bundle))
    calls = []
    restorer.tap = lambda graph, feeds, output: calls.append((graph.key, output.shape[0]))
    images = [rng.random((16, 16, 3), dtype=np.float32) for _ in range(3)]
    images += [rng.random((12, 20, 3), dtype=np.float32), rng.random((7, 9, 3), dtype=np.float32),
               rng.random((40, 24, 3), dtype=np.float32)]
    batch = restorer.restore_batch(images, Tiling(tile=32))
    assert max(n for _, n in calls) >= 2  # shared calls happened
    restorer.tap = None
    for image, got in zip(images, batch):
        alone = restorer.restore(image, tiling=Tiling(tile=32))
        assert got.bucket == alone.bucket and got.image.shape == alone.image.shape
        np.testing.assert_allclose(got.image, alone.image, atol=1e-5)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-5)
    assert restorer.restore_batch([]) == []
    with pytest.raises(ImageError, match="expected an"):
        restorer.restore_batch([images[0], np.zeros((4, 4), np.float32)])


def test_graceful_stop_takes_sigterm_back_from_a_library_and_restores_the_original():
    """ray.init installs its own SIGTERM handler (log, exit 15); install() takes it back, and
    leaving the block restores what was there before the block, not the library's."""
    import signal

    from mordasr.runtime.signals import GracefulStop

    original = signal.getsignal(signal.SIGTERM)
    with GracefulStop("test") as stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what a library started inside the block does
        stop.install()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested.is_set() and stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is original
