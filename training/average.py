"""Average the weights of base checkpoints fine-tuned from one start (a "model soup").

Copies of one model fine-tuned on the same task from the same weights stay in one basin of the
loss, and the mean of their weights is often better than each of them (Wortsman et al., "Model
soups", ICML 2022): continuations of the sr stage with other seeds or settings trade one recipe
against another, and their mean keeps much of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mordasr.errors import CheckpointError


def average_checkpoints(paths: Sequence[str | Path], out: str | Path,
                        weights: Sequence[float] | None = None) -> Path:
    """Write to ``out`` the base checkpoint whose every floating-point tensor is the weighted mean
    of the same tensor in ``paths`` (equal weights unless given). Integer buffers must agree."""
    from mordasr.model.io import load_checkpoint, save_checkpoint

    if len(paths) < 2:
        raise ValueError("average: give at least two checkpoints")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths) or min(weights) <= 0:
        raise ValueError(f"average: one positive weight per checkpoint ({len(paths)}), got {weights}")
    models, metas = [], []
    for path in paths:
        model, meta = load_checkpoint(path, add_adapters=False)
        if meta.get("kind") != "base" or model.has_adapters:
            raise CheckpointError(f"{path}: not a base checkpoint (average bases, then train adapters on the mean)")
        if models and model.config.to_dict() != models[0].config.to_dict():
            raise CheckpointError(f"{path}: its model config differs from {paths[0]}'s; only copies of one "
                                  "model can be averaged")
        models.append(model)
        metas.append(meta)
    states = [m.state_dict() for m in models]
    total = sum(weights)
    mean = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            mean[name] = (sum(w * s[name] for w, s in zip(weights, states)) / total).to(first.dtype)
        elif all(s[name].equal(first) for s in states[1:]):
            mean[name] = first
        else:
            raise CheckpointError(f"average: the integer buffer {name} differs between checkpoints")
    models[0].load_state_dict(mean, strict=True)
    sources = [{"path": str(p), "weight": w, "last_stage": (m.get("history") or [{}])[-1]}
               for p, w, m in zip(paths, weights, metas)]
    done_by_all = [s for s in metas[0].get("stages_done", []) if all(s in m.get("stages_done", []) for m in metas)]
    meta = {"kind": "base", "random_weights": False, "training": metas[0].get("training", {}), "final_losses": {},
            "stages_done": done_by_all,
            "history": list(metas[0].get("history", [])) + [{"stage": "average", "sources": sources}]}
    return save_checkpoint(models[0], out, meta)
