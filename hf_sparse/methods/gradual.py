"""Gradual threshold pruning for RNNs (Narang et al. 2017, "Exploring Sparsity in RNNs").

From ``start_step`` a monotone threshold eps grows with two slopes and every ``frequency`` steps
until ``end_step`` the mask keeps only the groups scoring above eps; pruned weights stay exactly zero
(:class:`~.schedules.NarangThreshold` holds the formula). Per layer, ``q`` is the 90th percentile
of the group scores of the dense layer at ``start_step``, ``theta = 2 q freq / (2 (ramp - start) +
3 (end - ramp))`` and ``phi = ramp_ratio * theta``; with ``phi = 1.5 theta`` the final threshold is
about ``q``. The final sparsity is implied.

A group's score is the largest ``|w|`` in it, as in Narang et al.'s block-sparse RNN follow-up;
for single weights that is ``|w|``. The paper's names ``start_itr``, ``ramp_itr``, ``end_itr`` and
``freq`` are accepted for ``start_step``, ``ramp_step``, ``end_step`` and ``frequency``.

Target mode (``target_density`` set): the paper's schedule *shape* is kept but scaled so the last
update lands on the target. At each update the threshold is ``eps(itr) / eps(end) * q_t`` where
``q_t`` is the score of the last group that keeping the density ``d`` of the layer would keep; the
update at ``end_step`` keeps exactly those groups, so each layer ends at density ``d`` (``scope:
global``: one ``q_t`` over all targets, and the whole model ends at ``d``). Under N:M
no update leaves fewer than N of any M (the best N kept weights of each run survive the threshold)
and the last keeps exactly the best N.

``initial_sparsity`` (hf_sparse's addition, for pretrained models): the lowest-scoring groups are
pruned once when the method is built, before step 0; the threshold schedule then prunes further.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import AliasChoices, Field

from . import register_method
from .base import MaskedMethod, MethodConfig
from .schedules import (
    INITIAL_SPARSITY_HELP,
    LAYER_DENSITY_HELP,
    NarangThreshold,
    StepWindow,
    initial_sparsity_error,
    keep_per_layer,
    layer_densities,
    one_shot,
    resolve_step,
    thresholds_per_layer,
)


class GradualConfig(MethodConfig):
    start_step: int | None = Field(None, ge=0, validation_alias=AliasChoices("start_step", "start_itr"),
                                   description="first pruning step (paper: start_itr); default start_fraction")
    ramp_step: int | None = Field(None, ge=0, validation_alias=AliasChoices("ramp_step", "ramp_itr"),
                                  description="step where the slope changes to phi (paper: ramp_itr)")
    end_step: int | None = Field(None, ge=0, validation_alias=AliasChoices("end_step", "end_itr"),
                                 description="last pruning step (paper: end_itr)")
    start_fraction: float = Field(0.1, ge=0, le=1, description="start_step as a fraction of the optimizer steps")
    ramp_fraction: float = Field(0.4, ge=0, le=1, description="ramp_step as a fraction of the optimizer steps")
    end_fraction: float = Field(0.75, ge=0, le=1, description="end_step as a fraction of the optimizer steps")
    frequency: int = Field(50, ge=1, validation_alias=AliasChoices("frequency", "freq"),
                           description="steps between mask updates (paper: freq)")
    q_percentile: float = Field(90.0, gt=0, lt=100, description="percentile of the scores that sets theta (paper: 90)")
    start_slope: float | None = Field(None, gt=0, description="theta; default derived from q as in the paper")
    ramp_slope: float | None = Field(None, gt=0, description="phi; default ramp_ratio * theta")
    ramp_ratio: float = Field(1.5, gt=0, description="phi / theta when ramp_slope is not given (paper: 1.5-2)")
    scope: Literal["layer", "global"] = Field(
        "layer", description="target mode: the density per layer, or over all targets with one threshold")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description=INITIAL_SPARSITY_HELP)
    layer_density: dict[str, float] = Field(default_factory=dict, description="target mode: " + LAYER_DENSITY_HELP)


@register_method
class GradualThresholdPruning(MaskedMethod):
    name = "gradual"
    Config = GradualConfig
    target_density_mode = "optional"
    supports_fsdp2 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = len(self.grids)
        self.theta = torch.zeros(n, dtype=torch.float64)
        self.phi = torch.zeros(n, dtype=torch.float64)
        self.thresholds = torch.zeros(n, dtype=torch.float64)
        self.layer_density = layer_densities(self, self.target_density)  # None: one target for every layer
        if self.config.initial_sparsity > 0:  # one-shot start; the threshold only prunes further
            with torch.no_grad():
                one_shot(self, 1.0 - self.config.initial_sparsity, "max")
                self.zero_masked()

    @classmethod
    def config_error(cls, config: GradualConfig, target_density: float | None):
        return initial_sparsity_error(config.initial_sparsity, target_density)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.window = StepWindow.resolve(total_steps, c.start_step, c.start_fraction, c.end_step, c.end_fraction,
                                         c.frequency)
        ramp = min(max(self.window.start, resolve_step(c.ramp_step, c.ramp_fraction, total_steps)), self.window.end)
        self.eps = NarangThreshold(self.window.start, ramp, self.window.end, c.frequency)

    def slopes(self, q: float) -> tuple[float, float]:
        """(theta, phi) from the paper's heuristic, unless the recipe gives them."""
        c = self.config
        return self.eps.slopes(q, c.ramp_ratio, c.start_slope, c.ramp_slope)

    def after_backward(self, step: int) -> None:
        self.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if not self.window.is_update_step(step):
            self.zero_masked()
            return
        scores = self.group_scores("max")
        if self.target_density is not None:
            q_t = thresholds_per_layer(self, scores, self.target_density)
            final = keep_per_layer(self, scores, self.target_density) if step == self.window.end else None
        if step == self.window.start and self.target_density is None:
            for i, (g, s) in enumerate(zip(self.grids, scores)):  # the quantile of the whole grid
                q = float(torch.quantile(g.gather(s).flatten().double(), self.config.q_percentile / 100))
                self.theta[i], self.phi[i] = self.slopes(q)
        for i, (g, s, mask) in enumerate(zip(self.grids, scores, self.masks)):
            if self.target_density is None:
                eps = self.eps(step, float(self.theta[i]), float(self.phi[i]))
                mask.copy_(g.prune_below(mask, s, eps))
            elif step == self.window.end:
                mask.copy_(final[i])
                eps = q_t[i]
            else:
                theta, phi = self.slopes(1.0)  # shape only: eps(itr) / eps(end) is independent of q
                eps = self.eps(step, theta, phi) / self.eps(self.window.end, theta, phi) * q_t[i]
                # the granularity's rule holds (N:M: the best N kept weights of each run stay)
                mask.copy_(g.prune_below(mask, s, eps, self.target_density))
            self.thresholds[i] = eps
        self.masks_changed()
        self.zero_masked()

    def metrics(self) -> dict[str, float]:
        return {"threshold_mean": float(self.thresholds.mean())}

    def state_dict(self):
        return {**super().state_dict(), "theta": self.theta.clone(), "phi": self.phi.clone(),
                "thresholds": self.thresholds.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.phi.copy_(state["phi"])
        self.thresholds.copy_(state["thresholds"])
