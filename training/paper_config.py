"""``mordasr-train fit`` configuration: a YAML or TOML file plus ``--set key=value`` overrides.

Sections mirror the dataclasses below; an unknown key anywhere is an error that names it. The
resolved configuration is written into every run folder (``config.resolved.yaml``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mordasr.data.realesrgan import RealESRGANConfig
from mordasr.errors import MordasrError
from mordasr.records import from_dict
from mordasr.training.vsd import VSDConfig

ABLATIONS = ("mor", "dense-lora", "lora-moe", "mor-no-zero", "mor-std-balance")


@dataclass
class RunConfig:
    preset: str = "tiny"
    base: str = "tiny"  # tiny: a shipped base's name (tiny, esrgan-student) or a base checkpoint folder
    sd_weights: str | None = None  # sd21: local diffusers folder (vae/, unet/, text_encoder/, tokenizer/)
    clip_weights: str | None = None  # sd21: local open_clip checkpoint
    random_weights: bool = False  # sd21 without weights (speed runs only)
    adapter: str = "mor"  # mor | lora | adaptir
    ablation: str = "mor"  # one of ABLATIONS (mor adapters only)
    steps: int = 1000
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 250
    keep_last: int = 3
    seed: int = 0


@dataclass
class DataConfig:
    train_dir: str | None = None  # HR images (recursive); None: the photographs shipped with scikit-image
    val_dir: str | None = None  # LR/HR pairs (RealSR / DRealSR layout); None: held-out photographs
    crop: int = 64  # HR crop side in pixels
    batch: int = 4  # per process
    val_images: int = 8
    degradation: RealESRGANConfig = field(default_factory=RealESRGANConfig)


@dataclass
class LossConfig:
    l2: float = 1.0
    perceptual: float = 1.0
    lpips_weights: str | None = None  # local LPIPS-VGG state dict; None: the structural fallback
    vsd: float = 1.0  # lambda1
    gan: float = 0.1  # lambda2
    balance: float = 0.01
    balance_alpha: float = 1.0


@dataclass
class GANConfig:
    loss: str = "hinge"  # hinge | non-saturating
    scales: int = 2
    channels: int = 32
    lr: float = 1e-4


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    grad_accum: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    ema: float = 0.0  # EMA decay of the adapter weights; 0 = off
    warmup_steps: int = 0


@dataclass
class FitConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        r, o = self.run, self.optim
        if r.preset not in ("tiny", "sd21"):
            raise MordasrError(f"run.preset must be tiny or sd21, got {r.preset!r}")
        if r.adapter not in ("mor", "lora", "adaptir"):
            raise MordasrError(f"run.adapter must be mor, lora or adaptir, got {r.adapter!r}")
        if r.ablation not in ABLATIONS:
            raise MordasrError(f"run.ablation must be one of {', '.join(ABLATIONS)}, got {r.ablation!r}")
        if r.ablation != "mor" and r.adapter != "mor":
            raise MordasrError("run.ablation applies to run.adapter = mor (dense-lora sets the adapter itself)")
        for name in ("steps", "eval_every", "log_every", "checkpoint_every", "keep_last"):
            if getattr(r, name) < 1:
                raise MordasrError(f"run.{name} must be at least 1")
        if self.data.crop < 16 or self.data.batch < 1 or self.data.val_images < 1:
            raise MordasrError("data.crop must be >= 16, data.batch and data.val_images >= 1")
        if o.lr <= 0 or o.grad_accum < 1 or not 0 <= o.ema < 1 or o.amp not in ("auto", "bf16", "off"):
            raise MordasrError("optim: lr > 0, grad_accum >= 1, 0 <= ema < 1, amp in auto/bf16/off")
        if self.gan.loss not in ("hinge", "non-saturating"):
            raise MordasrError(f"gan.loss must be hinge or non-saturating, got {self.gan.loss!r}")
        if not 0 <= self.vsd.t_min < self.vsd.t_max < 1000:
            raise MordasrError("vsd: 0 <= t_min < t_max < 1000")
        try:
            self.data.degradation.validate()
        except ValueError as err:
            raise MordasrError(f"data.{err}") from None

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise MordasrError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def load_fit_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> FitConfig:
    """Defaults, then the file (``.yaml``/``.yml``/``.toml``), then ``--set`` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MordasrError(f"config file {path} does not exist")
        try:
            if path.suffix == ".toml":
                tree = tomllib.loads(path.read_text())
            elif path.suffix in (".yaml", ".yml"):
                tree = yaml.safe_load(path.read_text()) or {}
            else:
                raise MordasrError(f"{path}: config files are .yaml, .yml or .toml")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
            raise MordasrError(f"{path}: cannot parse ({str(err).splitlines()[0]})") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise MordasrError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.vsd=0.5")
        _set(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = from_dict(FitConfig, tree, "config", coerce=True)
    config.validate()
    return config


def write_resolved(config: FitConfig, folder: str | Path) -> Path:
    from mordasr.runtime.atomic import atomic_write

    return atomic_write(Path(folder) / "config.resolved.yaml",
                        yaml.safe_dump(config.to_dict(), sort_keys=False))
