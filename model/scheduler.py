"""Scheduler constants of the one-step x0 update, taken from diffusers' DDPMScheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OneStepSchedule:
    timestep: int
    sqrt_alpha_prod: float
    sqrt_one_minus_alpha_prod: float

    def x0(self, z, eps):
        """``z_h = (z_l - sqrt(1 - a_T) * eps) / sqrt(a_T)`` (works on torch and numpy)."""
        return (z - self.sqrt_one_minus_alpha_prod * eps) / self.sqrt_alpha_prod


def one_step_schedule(scheduler_config: dict, timestep: int) -> OneStepSchedule:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**scheduler_config)
    alpha_prod = float(scheduler.alphas_cumprod[timestep])
    return OneStepSchedule(timestep, math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod))
