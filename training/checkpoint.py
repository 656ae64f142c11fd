"""Training state on disk: everything ``--resume`` needs to continue bit for bit.

A checkpoint folder ``checkpoints/step-NNNNNNN/`` holds ``state.pt``: the trainable tensors (and
the adapters' buffers), the variational UNet's LoRA and the discriminator, every optimizer and
scheduler, the EMA weights, the step, and the RNG states (Python, torch CPU/CUDA, the numpy
generators of the data and of the degradations). It is written to a temporary folder and renamed,
so a killed run never leaves half a checkpoint; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mordasr.errors import CheckpointError
from mordasr.runtime.atomic import atomic_directory

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state(generators: dict[str, np.random.Generator]) -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {name: g.bit_generator.state for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, np.random.Generator]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.bit_generator.state = state["numpy"][name]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def save_state(run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:07d}"
    with atomic_directory(target) as stage:
        torch.save(state, stage / STATE_FILE)
    for _, old in checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_state(run_dir: str | Path) -> tuple[int, dict[str, Any], Path] | None:
    """(step, state, folder) of the newest checkpoint under ``run_dir``; None if there is none."""
    found = checkpoints(run_dir)
    if not found:
        return None
    step, folder = found[-1]
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged file: torch raises several types
        raise CheckpointError(f"{folder / STATE_FILE}: unreadable checkpoint ({err})") from None
    return step, state, folder


def load_latest(run_dir: str | Path, preset: str, adapter: str) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint's state, checked against the run's preset and adapter; None if none."""
    latest = latest_state(run_dir)
    if latest is None:
        return None
    step, state, folder = latest
    saved = (state.get("preset"), state.get("adapter"))
    if saved != (preset, adapter):
        raise CheckpointError(f"{folder} is a {saved[0]}/{saved[1]} checkpoint, this run is {preset}/{adapter}; "
                              "resume with the config it was trained with")
    return step, state
