"""What a training run writes as it goes: ``metrics.csv``, TensorBoard when it is installed, and
the router's statistics (active ranks against severity, expert usage)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mordasr.model.adapters.mor import MoRLayer


def router_statistics(model: nn.Module, severity: torch.Tensor) -> dict:
    """Active ranks per sample (mean over MoR layers) vs severity, and expert usage per slot."""
    active, usage = [], []
    for layer in model.modules():
        if isinstance(layer, MoRLayer) and layer.last_routing is not None:
            _, kept = layer.last_routing
            routed = kept[:, : layer.n_experts].float().sum(-1) * layer.expert_size
            active.append(layer.r_shared + routed)
            usage.append(kept.float().mean(0))
    if not active:
        return {}
    per_sample = torch.stack(active).mean(0).detach().cpu()
    sev = severity.detach().float().cpu()
    varied = len(sev) > 1 and sev.std() > 0 and per_sample.std() > 0
    corr = float(torch.corrcoef(torch.stack([per_sample, sev]))[0, 1]) if varied else 0.0
    slots = max(u.numel() for u in usage)
    hist = torch.stack([F.pad(u.detach().cpu(), (0, slots - u.numel())) for u in usage]).mean(0)
    return {"active_ranks": float(per_sample.mean()), "active_ranks_vs_severity": corr,
            "expert_usage": [round(float(v), 4) for v in hist]}


def tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.csv always has the same numbers
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def write_metrics(folder: Path, rows: list[dict]) -> None:
    import io

    from mordasr.runtime.atomic import atomic_write

    buffer = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(folder / "metrics.csv", buffer.getvalue())
