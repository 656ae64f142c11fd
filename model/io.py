"""Checkpoints: a folder with ``config.json`` and ``model.safetensors``.

A *base* checkpoint holds the frozen model without adapters (the stand-in for "pretrained");
an *adapted* checkpoint holds everything, adapters included. ``meta`` in ``config.json``
records which one it is and whether the weights are random (never to be mistaken for trained).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from mordasr.errors import CheckpointError
from mordasr.model.config import ModelConfig
from mordasr.model.onestep import OneStepSR
from mordasr.records import RecordError

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


# The bases shipped in the package, by name: every command that takes a base takes these names.
SHIPPED_BASES = {
    "tiny": "the fidelity base: trained end to end against HR photographs (mordasr-train base)",
    "esrgan-student": "Real-ESRGAN x4plus distilled into the tiny structure (mordasr-train distill)",
}
DEFAULT_BASE = "esrgan-student"


def base_path(name_or_path: str | Path | None = None) -> Path:
    """A shipped base by name (``SHIPPED_BASES``; None: ``DEFAULT_BASE``), or a checkpoint folder."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_BASE
    if name in SHIPPED_BASES:
        return PRETRAINED_DIR / name
    path = Path(name)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base {name!r} is neither a shipped base ({', '.join(SHIPPED_BASES)}) nor a "
                              "checkpoint folder (config.json + model.safetensors)")
    return path


def save_checkpoint(model: OneStepSR, path: str | Path, meta: dict | None = None) -> Path:
    """Write atomically: a temporary sibling folder renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        data = {"model": model.config.to_dict(),
                "meta": {"has_adapters": model.has_adapters, **(meta or {})}}
        (tmp / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: not a mordasr checkpoint (no config.json)")
    try:
        data = json.loads(config_file.read_text())
        return ModelConfig.from_dict(data["model"]), data.get("meta", {})
    except (ValueError, KeyError, TypeError, RecordError) as err:
        raise CheckpointError(f"{config_file}: invalid checkpoint config ({err})") from None


def load_checkpoint(path: str | Path, *, add_adapters: bool = True,
                    adapter: str | None = None) -> tuple[OneStepSR, dict]:
    """Load a base or adapted checkpoint.

    From a base checkpoint, fresh adapters are added when ``add_adapters`` (of kind ``adapter``
    if given). From an adapted checkpoint, the model comes back exactly as saved.
    """
    path = Path(path)
    config, meta = read_checkpoint_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing model.safetensors")
    try:
        state = load_file(weights)
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{weights}: unreadable weights ({err})") from None
    saved_with_adapters = bool(meta.get("has_adapters"))
    if saved_with_adapters and adapter is not None and adapter != config.adapter.kind:
        raise CheckpointError(f"{path} holds {config.adapter.kind} adapters, not {adapter}")
    if not saved_with_adapters and adapter is not None:
        config.adapter.kind = adapter
    model = OneStepSR(config, with_adapters=saved_with_adapters)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not match the {config.preset} preset ({first})") from None
    if not saved_with_adapters and add_adapters:
        model.add_adapters()
    model.eval()
    return model, meta

