"""Training and validation data from folders.

- ``HRFolder``: every image under a folder (recursively), random square crops with flips. A file
  that cannot be read is skipped with a warning and counted; an empty folder is an error.
- ``PairedFolder``: LR/HR validation pairs in the RealSR / DRealSR layouts: ``HR/`` and ``LR/``
  (or ``*_HR``/``*_LR`` folders) with matching names, or one folder of ``<name>_HR.png`` and
  ``<name>_LR4.png`` files. Names match after dropping ``_HR``, ``_LR<k>`` and ``_x<k>``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from mordasr.data.samples import CropSampler
from mordasr.errors import ImageError, MordasrError
from mordasr.runtime.images import IMAGE_SUFFIXES, read_image

log = logging.getLogger(__name__)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MordasrError(f"data folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class HRFolder(CropSampler):
    """HR images from a folder; ``sample(n)`` gives (n, crop, crop, 3) float32 crops in [0, 1]."""

    def __init__(self, folder: str | Path, crop: int, seed: int = 0, max_pixels: int = 64_000_000) -> None:
        files = image_files(folder)
        if not files:
            raise MordasrError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.images: list[np.ndarray] = []
        self.skipped: list[tuple[Path, str]] = []
        for path in files:
            try:
                image = read_image(path, max_pixels=max_pixels)
            except ImageError as err:
                self.skipped.append((path, str(err)))
                log.warning("skipping %s: %s", path, err)
                continue
            if min(image.shape[:2]) < crop:
                self.skipped.append((path, f"smaller than the {crop} px crop"))
                log.warning("skipping %s: smaller than the %d px crop", path, crop)
                continue
            self.images.append(image)
        if not self.images:
            raise MordasrError(f"data folder {folder}: none of its {len(files)} images is usable "
                               f"({len(self.skipped)} skipped, first: {self.skipped[0][1]})")
        if self.skipped:
            log.warning("%s: %d of %d images skipped", folder, len(self.skipped), len(files))
        super().__init__(self.images, crop, seed)


_TAGS = re.compile(r"(_hr|_lr\d*|_x\d+)$", re.IGNORECASE)


def _pair_key(path: Path) -> str:
    stem = path.stem
    while True:
        stripped = _TAGS.sub("", stem)
        if stripped == stem:
            return stripped.lower()
        stem = stripped


def _is_lr(path: Path, root: Path) -> bool | None:
    parts = [p.lower() for p in path.relative_to(root).parts[:-1]]
    if any(p in ("lr",) or p.endswith("_lr") or re.fullmatch(r"lr(_?x?\d+)?", p) for p in parts):
        return True
    if any(p in ("hr",) or p.endswith("_hr") for p in parts):
        return False
    if re.search(r"_lr\d*$", path.stem, re.IGNORECASE):
        return True
    if re.search(r"_hr$", path.stem, re.IGNORECASE):
        return False
    return None


class PairedFolder:
    """(name, LR, HR) validation pairs; HR must be ``scale`` times the LR size (it is cropped to it)."""

    def __init__(self, folder: str | Path, scale: int, limit: int | None = None) -> None:
        root = Path(folder)
        lr_files, hr_files = {}, {}
        for path in image_files(root):
            side = _is_lr(path, root)
            if side is not None:
                (lr_files if side else hr_files)[_pair_key(path)] = path
        keys = sorted(set(lr_files) & set(hr_files))
        if not keys:
            raise MordasrError(f"{root}: no LR/HR pairs found (expected HR/ and LR/ folders with matching "
                               "names, or <name>_HR.png with <name>_LR4.png)")
        self.pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
        for key in keys[:limit]:
            lr, hr = read_image(lr_files[key]), read_image(hr_files[key])
            h, w = lr.shape[0] * scale, lr.shape[1] * scale
            if hr.shape[0] < h or hr.shape[1] < w:
                raise MordasrError(f"{hr_files[key]}: HR is {hr.shape[1]}x{hr.shape[0]}, smaller than "
                                   f"x{scale} its LR ({lr.shape[1]}x{lr.shape[0]})")
            self.pairs.append((key, lr, hr[:h, :w]))
