"""Gradual magnitude pruning (Zhu & Gupta 2017): the baseline every pruning library ships.

Sparsity follows the cubic schedule ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3``,
applied every ``frequency`` steps from ``t0`` to ``t_end`` (and always exactly at ``t_end``). At each
update the smallest-magnitude weights are pruned, per layer or globally, keeping exactly
``round(density * n)`` weights, so the final density is the target to the weight. Pruned weights
are held at zero after every optimizer step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from . import register_method
from .base import MaskedMethod, MethodConfig
from .schedules import resolve_step, topk_mask


class GMPConfig(MethodConfig):
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i: sparsity at the first update")
    start_step: int | None = Field(None, ge=0, description="t0; default start_fraction of the run")
    end_step: int | None = Field(None, ge=0, description="t_end; default end_fraction of the run")
    start_fraction: float = Field(0.1, ge=0, le=1, description="t0 as a fraction of the optimizer steps")
    end_fraction: float = Field(0.75, ge=0, le=1, description="t_end as a fraction of the optimizer steps")
    frequency: int = Field(50, ge=1, description="steps between mask updates (Zhu & Gupta's delta t)")
    scope: Literal["layer", "global"] = Field("layer", description="rank magnitudes per layer or across all targets")


@register_method
class GradualMagnitudePruning(MaskedMethod):
    name = "gmp"
    Config = GMPConfig
    target_density_mode = "required"

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.t0 = resolve_step(c.start_step, c.start_fraction, total_steps)
        self.t_end = max(self.t0, resolve_step(c.end_step, c.end_fraction, total_steps))

    def density_at(self, step: int) -> float:
        """Scheduled density after optimizer step ``step`` (0-based)."""
        s_f, s_i = 1.0 - self.target_density, self.config.initial_sparsity
        if step >= self.t_end:
            return 1.0 - s_f
        progress = 0.0 if self.t_end == self.t0 else (step - self.t0) / (self.t_end - self.t0)
        return 1.0 - (s_f + (s_i - s_f) * (1.0 - progress) ** 3)

    def is_update_step(self, step: int) -> bool:
        return step == self.t_end or (self.t0 <= step < self.t_end and (step - self.t0) % self.config.frequency == 0)

    def after_backward(self, step: int) -> None:
        self.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if self.is_update_step(step):
            self.prune_to(self.density_at(step))
        self.zero_masked()

    @torch.no_grad()
    def prune_to(self, density: float) -> None:
        scores = [t.param.detach().abs() for t in self.targets]
        if self.config.scope == "layer":
            for mask, s in zip(self.masks, scores):
                mask.copy_(topk_mask(s, round(density * s.numel())))
        else:
            flat = torch.cat([s.flatten() for s in scores])
            keep = topk_mask(flat, round(density * flat.numel())).split([s.numel() for s in scores])
            for mask, k in zip(self.masks, keep):
                mask.copy_(k.view_as(mask))
        self.masks_changed()
