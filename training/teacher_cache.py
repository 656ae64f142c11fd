"""The teacher's outputs on degraded crops of HR photographs, computed once and kept on disk.

A distillation run needs the teacher's answer for every training input, and a teacher such as
Real-ESRGAN x4plus takes seconds per crop on a CPU: far more than a student's training step. So
the inputs are planned up front (``plan_samples``: which photograph, where, which degradation,
which seed), each is degraded and restored by the teacher once, and the result is stored under a
key that covers everything it depends on: the teacher's files, the photograph's bytes, the crop,
the degradation kind and its seed (``Sample.key``). A second run, or a run killed half-way,
finds what is done and computes only the rest; a changed teacher file changes every key, so
nothing stale is reused. Each entry is one ``.npz`` (the LR crop, the teacher's output and the
HR crop, uint8) written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mordasr.errors import MordasrError
from mordasr.runtime.cache_dirs import user_cache_dir
from mordasr.runtime.images import as_float, to_uint8
from mordasr.training.teachers import Teacher

CACHE_ENV = "MORDASR_TEACHER_CACHE"
# Bumped when what a sample's inputs produce changes (the degradation code), so old entries miss.
RECIPE_VERSION = 1


def default_cache_dir() -> Path:
    return user_cache_dir(CACHE_ENV, "teacher-outputs")


@dataclass(frozen=True)
class Photo:
    """An HR photograph: its name (for messages), its content hash and its pixels (uint8 HWC)."""

    name: str
    sha256: str
    pixels: np.ndarray


@dataclass(frozen=True)
class Sample:
    photo: int  # index into the photographs
    y: int  # top-left of the HR crop
    x: int
    crop: int  # HR crop side
    kind: str  # degradation kind (mordasr/data/degradations.py: clean, synthetic, compound, realesrgan)
    seed: int  # the degradation's own seed

    def key(self, teacher_fingerprint: str, photo_sha256: str, scale: int) -> str:
        fields = {**asdict(self), "photo": photo_sha256, "teacher": teacher_fingerprint, "scale": scale,
                  "recipe": RECIPE_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def plan_samples(photos: Sequence[Photo], count: int, crop: int, mix: tuple[tuple[str, float], ...],
                 seed: int) -> list[Sample]:
    """``count`` crops drawn in proportion to each photograph's area, each with a kind from ``mix``
    and its own seed; the same arguments give the same plan."""
    usable = [i for i, p in enumerate(photos) if min(p.pixels.shape[:2]) >= crop]
    if not usable:
        raise MordasrError(f"no photograph is at least {crop} px on its short side")
    areas = np.array([photos[i].pixels.shape[0] * photos[i].pixels.shape[1] for i in usable], np.float64)
    rng = np.random.default_rng(seed)
    kinds, shares = [k for k, _ in mix], [p for _, p in mix]
    plan = []
    for _ in range(count):
        i = usable[rng.choice(len(usable), p=areas / areas.sum())]
        h, w = photos[i].pixels.shape[:2]
        plan.append(Sample(i, int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1)), crop,
                           str(rng.choice(kinds, p=shares)), int(rng.integers(2**31))))
    return plan


def degrade_sample(photo: Photo, sample: Sample, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR uint8, HR uint8) for one sample: the HR crop degraded by its kind under its own seed."""
    from mordasr.data.degradations import mixed_degraded_batch

    hr = as_float(photo.pixels[sample.y:sample.y + sample.crop, sample.x:sample.x + sample.crop])
    lr = mixed_degraded_batch(hr[None], scale, np.random.default_rng(sample.seed), ((sample.kind, 1.0),))[0]
    return to_uint8(lr), to_uint8(hr)


@dataclass
class CacheStats:
    reused: int = 0
    computed: int = 0


class TeacherCache:
    """``<root>/<key[:2]>/<key>.npz`` entries holding ``lr``, ``teacher`` and ``hr`` (uint8 HWC)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str, with_hr: bool = True) -> dict[str, np.ndarray]:
        with np.load(self.path(key)) as data:
            return {k: data[k] for k in (("lr", "teacher", "hr") if with_hr else ("lr", "teacher"))}

    def store(self, key: str, lr: np.ndarray, teacher: np.ndarray, hr: np.ndarray) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, lr=lr, teacher=teacher, hr=hr)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)  # a killed run leaves no half entry under the key
        return path

    def fill(self, teacher: Teacher, photos: Sequence[Photo], plan: Sequence[Sample],
             on_sample: Callable[[int, bool], None] | None = None) -> tuple[list[str], CacheStats]:
        """Make sure every planned sample has an entry; returns the keys in plan order and how many
        were reused or computed. ``on_sample(index, computed)`` hears of each."""
        fingerprint, stats, keys = teacher.fingerprint(), CacheStats(), []
        for index, sample in enumerate(plan):
            photo = photos[sample.photo]
            key = sample.key(fingerprint, photo.sha256, teacher.scale)
            keys.append(key)
            computed = not self.has(key)
            if computed:
                lr, hr = degrade_sample(photo, sample, teacher.scale)
                out = teacher.restore(lr)
                if out.shape[:2] != (lr.shape[0] * teacher.scale, lr.shape[1] * teacher.scale):
                    raise MordasrError(f"teacher {teacher.name} returned {out.shape[:2]} for a {lr.shape[:2]} input "
                                       f"at scale {teacher.scale}")
                self.store(key, lr, to_uint8(out), hr)
                stats.computed += 1
            else:
                stats.reused += 1
            if on_sample:
                on_sample(index, computed)
        return keys, stats
