"""The moving average of weights (training/ema.py) and the base trainer's use of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mordasr.training.base_config import BaseTrainingConfig
from mordasr.training.base_trainer import _fit
from mordasr.training.cli import main as train_main
from mordasr.training.ema import WeightEMA


def test_update_is_the_exponential_average_and_applied_puts_the_weights_back():
    module = torch.nn.Linear(2, 1)
    module.bias.requires_grad_(False)  # only trainable weights are averaged
    w0 = module.weight.detach().clone()
    ema = WeightEMA(module, 0.75)
    assert set(ema.state_dict()) == {"weight"}
    with torch.no_grad():
        module.weight.add_(4.0)
    ema.update(module)
    assert torch.allclose(ema.state_dict()["weight"], w0 + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    with ema.applied(module):
        assert torch.equal(module.weight, ema.state_dict()["weight"])
    assert torch.equal(module.weight, w0 + 4.0)
    other = WeightEMA(torch.nn.Linear(2, 1), 0.5)
    other.load_state_dict({"weight": torch.zeros(1, 2), "bias": torch.zeros(1)})
    assert not other.state_dict()["weight"].any()
    with pytest.raises(ValueError, match="not this module's trainable weights"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(module, 1.0)


def _fit_line(folder, ema: float, fail_at: int | None = None):
    """Four AdamW steps on a least-squares line; ``fail_at`` kills the fit before that step."""
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    x = torch.randn(16, 3)
    y = x.sum(1, keepdim=True)

    def loss(step: int) -> torch.Tensor:
        if step == fail_at:
            raise KeyboardInterrupt
        return F.mse_loss(module(x), y)

    def evaluate() -> dict[str, float]:
        return {"weight_sum": module.weight.sum().item()}

    folder.mkdir(exist_ok=True)
    cfg = BaseTrainingConfig(checkpoint_every=1, ema=ema)
    _fit(module, loss, 4, 0.1, "line", cfg, folder, [np.random.default_rng(0)], True, evaluate)
    return module


def test_base_fit_ends_with_the_average_and_a_killed_fit_resumes_it_exactly(tmp_path):
    plain = _fit_line(tmp_path / "plain", 0.0)
    straight = _fit_line(tmp_path / "straight", 0.5)
    assert not torch.equal(plain.weight, straight.weight)  # the average, not the last weights
    rows = (tmp_path / "straight" / "curves-line.csv").read_text().splitlines()
    assert float(rows[-1].split(",")[-1]) == pytest.approx(straight.weight.sum().item())  # curves score it
    with pytest.raises(KeyboardInterrupt):
        _fit_line(tmp_path / "halves", 0.5, fail_at=2)
    resumed = _fit_line(tmp_path / "halves", 0.5)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_train_cli_base_records_ema_and_refuses_a_decay_of_one(tmp_path):
    bad = CliRunner().invoke(train_main, ["base", "-o", str(tmp_path / "b"), "--ema", "1", "-q"])
    assert bad.exit_code == 2 and "--ema" in bad.stderr and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="ema"):
        BaseTrainingConfig(ema=-0.1).validate()
