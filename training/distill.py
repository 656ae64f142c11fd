"""``mordasr-train distill``: a student with the MoR-DASR structure learns a teacher's restorations.

1. The teacher (``training/teachers.py``) restores degraded crops of HR photographs once; its
   outputs are cached on disk (``training/teacher_cache.py``), reused by every later run.
2. The student -- router, encoder, UNet at the fixed timestep, x0 step, decoder: the structure
   every export mode, precision and backend takes -- starts from a shipped base (or a checkpoint,
   or from scratch) and learns the teacher's output end to end: L1 to the teacher, plus
   ``hr_weight`` x L1 to the HR crop when asked (0 by default: the teacher alone). Its encoder,
   UNet and decoder train; the degradation estimator is kept (fitted afresh from scratch).
3. Random windows of the cached crops, with flips, under ``torch.autocast`` in bfloat16 on the
   CPU where it has the instructions (``precision="bf16"``; FP32 otherwise).

Resumable like base training (a resume state every ``checkpoint_every`` steps), with a curve of
the student's agreement with the teacher and its fidelity to HR on held-out cached crops. The
student is written as a base checkpoint that records its teacher (name, fingerprint, licence).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mordasr.data.degradations import parse_mix
from mordasr.errors import MordasrError
from mordasr.metrics import psnr
from mordasr.model import OneStepSR, preset_config
from mordasr.model.io import base_path, load_checkpoint, save_checkpoint
from mordasr.runtime.manifest import sha256_file
from mordasr.training.base_trainer import _fit, identity_start, train_estimator, unet_shape, with_unet_shape
from mordasr.training.common import PRECISIONS, autocast, model_device, nchw, seed_everything
from mordasr.training.teacher_cache import Photo, TeacherCache, plan_samples
from mordasr.training.teachers import Teacher, TeacherError, load_teacher

log = logging.getLogger(__name__)

SCRATCH = "scratch"


@dataclass
class DistillConfig:
    teacher: str = "realesrgan-x4plus"
    start: str = "tiny"  # a shipped base's name, a checkpoint folder, or "scratch"
    data: str | None = None  # folder of HR photographs; None: scikit-image's photographs
    cache: str | None = None  # teacher cache folder; None: ~/.cache/mordasr/teacher-outputs
    samples: int = 2000  # crops the teacher restores (the cache holds each once)
    sample_crop: int = 384  # HR side of each cached crop
    held_out: int = 32  # cached crops kept out of training, for the agreement curve
    mix: str = "clean=0.25,synthetic=0.45,realesrgan=0.30"
    steps: int = 4000
    batch: int = 8
    crop: int = 256  # HR side of the windows the student trains on (inside a cached crop)
    lr: float = 5e-4
    hr_weight: float = 0.0  # weight of L1 against HR beside L1 against the teacher
    precision: str = "bf16"
    ema: float = 0.0
    checkpoint_every: int = 250
    unet_channels: tuple[int, ...] | None = None
    unet_layers: int | None = None
    seed: int = 0

    def validate(self) -> None:
        for name in ("samples", "sample_crop", "steps", "batch", "crop", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.held_out < self.samples:
            raise ValueError(f"held_out must lie in 0..{self.samples - 1} (fewer than the samples)")
        if self.crop % 16 or self.sample_crop % 16:
            raise ValueError("crop and sample_crop must be multiples of 16 (scale x the latent grid's multiple)")
        if self.crop > self.sample_crop:
            raise ValueError(f"crop {self.crop} must not exceed sample_crop {self.sample_crop}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.lr <= 0 or self.hr_weight < 0 or not 0 <= self.ema < 1:
            raise ValueError("lr must be positive, hr_weight >= 0 and ema in [0, 1)")
        parse_mix(self.mix, "--mix")


def load_photos(folder: str | None) -> list[Photo]:
    """The HR photographs of ``folder`` (recursive; unreadable ones skipped with a warning) as
    uint8, each with the sha256 of its file; or scikit-image's training photographs."""
    from mordasr.runtime.images import to_uint8

    if folder is None:
        from mordasr.data.samples import TRAIN_IMAGES, load_sample_image

        pixels = [to_uint8(load_sample_image(n)) for n in TRAIN_IMAGES]
        return [Photo(f"skimage:{n}", _array_hash(p), p) for n, p in zip(TRAIN_IMAGES, pixels)]
    from mordasr.data.folders import image_files
    from mordasr.errors import ImageError
    from mordasr.runtime.images import read_image

    photos = []
    files = image_files(folder)
    for path in files:
        try:
            photos.append(Photo(str(path), sha256_file(path), to_uint8(read_image(path))))
        except ImageError as err:
            log.warning("skipping %s: %s", path, err)
    if not photos:
        raise MordasrError(f"data folder {folder} holds no readable images ({len(files)} files)")
    return photos


def _array_hash(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def build_student(cfg: DistillConfig) -> tuple[OneStepSR, bool]:
    """The student before distillation and whether its estimator must be fitted (from scratch)."""
    if cfg.start == SCRATCH:
        preset = preset_config("tiny")
        model = OneStepSR(replace(preset, unet=unet_shape(preset.unet, cfg.unet_channels, cfg.unet_layers)),
                          with_adapters=False)
        identity_start(model.unet)
        return model, True
    model, meta = load_checkpoint(base_path(cfg.start), add_adapters=False)
    if meta.get("has_adapters"):
        raise MordasrError(f"--from {cfg.start} holds adapters; a student starts from a base checkpoint")
    return with_unet_shape(model, cfg.unet_channels, cfg.unet_layers), False


class CachedPairs:
    """The cached (LR, teacher, HR) crops in memory as uint8, and random training windows of them."""

    def __init__(self, cache: TeacherCache, keys: list[str], scale: int, with_hr: bool) -> None:
        entries = [cache.load(k, with_hr) for k in keys]
        self.scale = scale
        self.lr = np.stack([e["lr"] for e in entries])
        self.teacher = np.stack([e["teacher"] for e in entries])
        self.hr = np.stack([e["hr"] for e in entries]) if with_hr else None

    def __len__(self) -> int:
        return len(self.lr)

    def window(self, rng: np.random.Generator, indices: np.ndarray, crop: int):
        """(lr, teacher, hr | None) float32 NHWC windows of ``crop`` HR px, randomly placed and flipped."""
        s, side = self.scale, crop // self.scale
        limit = self.lr.shape[1] - side
        lr, teacher, hr = [], [], []
        for i in indices:
            y, x = rng.integers(0, limit + 1, size=2)
            flip_x, flip_y = rng.random() < 0.5, rng.random() < 0.5
            parts = [self.lr[i, y:y + side, x:x + side], self.teacher[i, y * s:(y + side) * s, x * s:(x + side) * s]]
            if self.hr is not None:
                parts.append(self.hr[i, y * s:(y + side) * s, x * s:(x + side) * s])
            parts = [p[:, ::-1] if flip_x else p for p in parts]
            parts = [p[::-1] if flip_y else p for p in parts]
            lr.append(parts[0])
            teacher.append(parts[1])
            if self.hr is not None:
                hr.append(parts[2])
        as_float = [np.stack(v).astype(np.float32) / 255 for v in (lr, teacher)]
        return as_float[0], as_float[1], (np.stack(hr).astype(np.float32) / 255 if hr else None)


def student_forward(model: OneStepSR, lr: torch.Tensor, precision: str) -> torch.Tensor:
    """The student's restoration in [0, 1] (float32), the UNet at the fixed timestep, no router
    (the base has no adapters to route)."""
    with autocast(precision):
        z_l = model.encode(lr)
        z_h = model.schedule.x0(z_l, model.denoise(z_l))
        out = model.vae.decode(z_h / model.config.latent_scale).sample
    return (out.float() + 1) / 2


def fill_cache(cfg: DistillConfig, teacher: Teacher, quiet: bool = False) -> tuple[TeacherCache, list[str]]:
    """Plan the training crops and make sure the cache holds the teacher's output for each."""
    photos = load_photos(cfg.data)
    plan = plan_samples(photos, cfg.samples, cfg.sample_crop, parse_mix(cfg.mix, "--mix"), cfg.seed)
    cache = TeacherCache(cfg.cache)
    bar = tqdm(total=len(plan), desc=f"teacher {teacher.name}", disable=quiet, dynamic_ncols=True, unit="crop")
    keys, stats = cache.fill(teacher, photos, plan, lambda _i, _computed: bar.update())
    bar.close()
    log.info("teacher cache %s: %d reused, %d computed", cache.root, stats.reused, stats.computed)
    return cache, keys


def distill(cfg: DistillConfig, out: str | Path | None, quiet: bool = False) -> Path:
    """Distil ``cfg.teacher`` into a student written to ``out`` (a base checkpoint); with ``out``
    None, only fill the teacher cache and return its folder. Every refusal (an unknown, missing or
    corrupt teacher, a teacher of another scale) comes before anything is written."""
    cfg.validate()
    teacher = load_teacher(cfg.teacher)
    model, fit_estimator = build_student(cfg)
    if teacher.scale != model.config.scale:
        raise TeacherError(f"teacher {teacher.name} upscales x{teacher.scale}, the student x{model.config.scale}: "
                           "distil a teacher of the student's scale")
    seed_everything(cfg.seed)
    cache, keys = fill_cache(cfg, teacher, quiet)
    if out is None:
        return cache.root
    path = Path(out)
    work = path.parent / f".{path.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    pairs = CachedPairs(cache, keys, model.config.scale, with_hr=bool(cfg.hr_weight))
    monitor_hr = np.stack([cache.load(k)["hr"] for k in keys[len(keys) - cfg.held_out:]]) if cfg.held_out else None
    train = np.arange(len(pairs) - cfg.held_out)
    monitor = np.arange(len(pairs) - cfg.held_out, len(pairs))
    rng = np.random.default_rng(cfg.seed + 3)
    trained = torch.nn.ModuleDict({"vae": model.vae, "unet": model.unet})
    device = model_device(model)
    timings: list[float] = []

    def loss(_step: int) -> torch.Tensor:
        timings.append(time.perf_counter())  # a step is the time from one loss call to the next
        lr, target, hr = pairs.window(rng, rng.choice(train, cfg.batch), cfg.crop)
        restored = student_forward(model, nchw(lr, device), cfg.precision)
        value = (restored - nchw(target, device)).abs().mean()
        if cfg.hr_weight:
            value = value + cfg.hr_weight * (restored - nchw(hr, device)).abs().mean()
        return value

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        found: dict[str, list[float]] = {"psnr_teacher": [], "psnr_hr": [], "psnr_teacher_hr": []}
        for chunk in np.array_split(monitor, max(1, len(monitor) // 8)):
            restored = student_forward(model, nchw(pairs.lr[chunk].astype(np.float32) / 255, device), "fp32")
            target = nchw(pairs.teacher[chunk].astype(np.float32) / 255, device)
            hr = nchw(monitor_hr[chunk - monitor[0]].astype(np.float32) / 255, device)
            found["psnr_teacher"].append(psnr(restored, target))
            found["psnr_hr"].append(psnr(restored, hr))
            found["psnr_teacher_hr"].append(psnr(target, hr))
        return {k: float(np.mean(v)) for k, v in found.items()}

    head = model.schedule.sqrt_alpha_prod / model.schedule.sqrt_one_minus_alpha_prod
    started = time.perf_counter()
    final = _fit(trained, loss, cfg.steps, cfg.lr, "distill", cfg, work, [rng], quiet,
                 evaluate if cfg.held_out else None, lr_multipliers={"unet.conv_out.": head})
    seconds = time.perf_counter() - started
    if fit_estimator:
        from mordasr.training.base_config import BaseTrainingConfig

        train_estimator(model, BaseTrainingConfig(data=cfg.data, seed=cfg.seed), work, quiet)
    meta = {"kind": "base", "random_weights": False, "stages_done": ["vae", "sr", "estimator"],
            "distilled_from": teacher.describe(),
            "training": {**asdict(cfg), "stage": "distill", "final_loss": final,
                         "seconds": round(seconds, 1),
                         "steps_per_second": _steps_per_second(timings)}}
    save_checkpoint(model, path, meta)
    return path


def _steps_per_second(starts: list[float]) -> float | None:
    """Training steps per second from the start times of the steps: the median step (the steps
    with an evaluation in them, or a resume, do not count)."""
    steps = np.diff(starts)
    return round(float(1 / np.median(steps)), 3) if len(steps) else None


def measure_steps_per_second(cfg: DistillConfig, steps: int = 20, warmup: int = 3) -> dict[str, float]:
    """Training steps per second of ``cfg``'s student in each precision, on random windows (no
    teacher needed): the figure that says whether bfloat16 autocast pays on this CPU."""
    model, _ = build_student(cfg)
    trained = torch.nn.ModuleDict({"vae": model.vae, "unet": model.unet})
    for p in trained.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained.parameters(), cfg.lr)
    side = cfg.crop // model.config.scale
    gen = torch.Generator().manual_seed(cfg.seed)
    lr = torch.rand(cfg.batch, 3, side, side, generator=gen)
    target = torch.rand(cfg.batch, 3, cfg.crop, cfg.crop, generator=gen)
    rates = {}
    for precision in PRECISIONS:
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            value = (student_forward(model, lr, precision) - target).abs().mean()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        rates[precision] = steps / (time.perf_counter() - start)
    return rates
