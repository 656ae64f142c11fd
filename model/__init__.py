"""The MoR-DASR model in PyTorch: adapter layers, injection, degradation estimator, one-step SR."""

from mordasr.model.config import AdapterConfig, ModelConfig, preset_config
from mordasr.model.onestep import OneStepSR

__all__ = ["AdapterConfig", "ModelConfig", "OneStepSR", "preset_config"]
