"""Gradual magnitude pruning (Zhu & Gupta 2017): the baseline every pruning library ships.

Sparsity follows the cubic schedule ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3``,
applied every ``frequency`` steps from ``t0`` to ``t_end`` (and always exactly at ``t_end``). A
nonzero ``s_i`` (``initial_sparsity``) is applied once when the method is built, before step 0 (a
one-shot start for a pretrained model), and held until the cubic begins at ``t0``. At each
update the lowest-scoring groups are pruned, per layer or globally, keeping ``density * n`` weights
(with per-layer targets, ``sparsity.targets.density``, each layer follows its own cubic to its own density)
(exactly ``round(density * n)`` when groups are single weights), so the final density is the
target. A group's score is the mean ``|w|`` of its weights (the L1 norm per weight, fair to the
smaller edge blocks); N:M keeps the largest of every M. Pruned weights are held at zero after
every optimizer step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from . import register_method
from .base import MaskedMethod, MethodConfig
from .schedules import (
    INITIAL_SPARSITY_HELP,
    LAYER_DENSITY_HELP,
    CubicSchedule,
    StepWindow,
    initial_sparsity_error,
    keep_per_layer,
    layer_densities,
    one_shot,
)


class GMPConfig(MethodConfig):
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i of the cubic; " + INITIAL_SPARSITY_HELP)
    start_step: int | None = Field(None, ge=0, description="t0; default start_fraction of the run")
    end_step: int | None = Field(None, ge=0, description="t_end; default end_fraction of the run")
    start_fraction: float = Field(0.1, ge=0, le=1, description="t0 as a fraction of the optimizer steps")
    end_fraction: float = Field(0.75, ge=0, le=1, description="t_end as a fraction of the optimizer steps")
    frequency: int = Field(50, ge=1, description="steps between mask updates (Zhu & Gupta's delta t)")
    scope: Literal["layer", "global"] = Field("layer", description="rank scores per layer or across all targets")
    layer_density: dict[str, float] = Field(default_factory=dict, description=LAYER_DENSITY_HELP)


@register_method
class GradualMagnitudePruning(MaskedMethod):
    name = "gmp"
    Config = GMPConfig
    target_density_mode = "required"
    supports_fsdp2 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_density = layer_densities(self, self.target_density)  # None: one target for every layer
        if self.config.initial_sparsity > 0:  # one-shot start: s_i from step 0 until the cubic begins at t0
            with torch.no_grad():
                one_shot(self, 1.0 - self.config.initial_sparsity, "mean")
                self.zero_masked()

    @classmethod
    def config_error(cls, config: GMPConfig, target_density: float | None):
        return initial_sparsity_error(config.initial_sparsity, target_density)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        window = StepWindow.resolve(total_steps, c.start_step, c.start_fraction, c.end_step, c.end_fraction,
                                    c.frequency)
        self.schedule = CubicSchedule(1.0 - c.initial_sparsity, self.target_density, window)
        self.layer_schedules = [CubicSchedule(1.0 - c.initial_sparsity, d, window) for d in self.layer_density or []]

    def density_at(self, step: int) -> float:
        """Scheduled density after optimizer step ``step`` (0-based)."""
        return self.schedule(step)

    def after_backward(self, step: int) -> None:
        self.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if self.schedule.window.is_update_step(step):
            self.prune_to(self.density_at(step), [s(step) for s in self.layer_schedules] or None)
        self.zero_masked()

    @torch.no_grad()
    def prune_to(self, density: float, per_layer: list[float] | None = None) -> None:
        """Keep ``density`` of the weights (at the scope), or ``per_layer[i]`` of grid i."""
        new = keep_per_layer(self, self.group_scores("mean"), density, per_layer)
        for mask, k in zip(self.masks, new):
            mask.copy_(k)
        self.masks_changed()
