"""Gradual threshold pruning for RNNs (Narang et al. 2017, "Exploring Sparsity in RNNs").

From ``start_itr`` a monotone threshold eps grows with two slopes and every ``freq`` iterations
until ``end_itr`` the mask keeps only ``|W| > eps``; pruned weights stay exactly zero:

    eps = theta * (itr - start_itr + 1) / freq                                  start_itr <= itr < ramp_itr
    eps = (theta * (ramp_itr - start_itr + 1) + phi * (itr - ramp_itr + 1)) / freq   ramp_itr <= itr <= end_itr

with, per layer, ``q`` the 90th percentile of ``|W|`` of the dense layer at ``start_itr`` and
``theta = 2 q freq / (2 (ramp_itr - start_itr) + 3 (end_itr - ramp_itr))``, ``phi = ramp_ratio * theta``.
(With ``phi = 1.5 theta`` the final threshold is about ``q``.) The final sparsity is implied.

Target mode (``target_density`` set): the paper's schedule *shape* is kept but scaled so the last
update lands on the target. At each update the threshold is ``eps(itr) / eps(end_itr) * q_t`` where
``q_t`` is the magnitude of the ``round(d * n)``-th largest current weight of the layer; the update at
``end_itr`` keeps exactly those ``round(d * n)`` weights, so each layer ends at density ``d``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from . import register_method
from .base import MaskedMethod, MethodConfig
from .schedules import kth_largest, resolve_step, topk_mask


class GradualConfig(MethodConfig):
    start_itr: int | None = Field(None, ge=0, description="first pruning iteration; default start_fraction of the run")
    ramp_itr: int | None = Field(None, ge=0, description="iteration where the slope changes to phi")
    end_itr: int | None = Field(None, ge=0, description="last pruning iteration")
    start_fraction: float = Field(0.1, ge=0, le=1, description="start_itr as a fraction of the optimizer steps")
    ramp_fraction: float = Field(0.4, ge=0, le=1, description="ramp_itr as a fraction of the optimizer steps")
    end_fraction: float = Field(0.75, ge=0, le=1, description="end_itr as a fraction of the optimizer steps")
    freq: int = Field(50, ge=1, description="iterations between mask updates")
    q_percentile: float = Field(90.0, gt=0, lt=100, description="percentile of |W| that sets theta (paper: 90)")
    start_slope: float | None = Field(None, gt=0, description="theta; default derived from q as in the paper")
    ramp_slope: float | None = Field(None, gt=0, description="phi; default ramp_ratio * theta")
    ramp_ratio: float = Field(1.5, gt=0, description="phi / theta when ramp_slope is not given (paper: 1.5-2)")


@register_method
class GradualThresholdPruning(MaskedMethod):
    name = "gradual"
    Config = GradualConfig
    target_density_mode = "optional"

    def __init__(self, targets, config, target_density, seed=0):
        super().__init__(targets, config, target_density, seed)
        self.theta = torch.zeros(len(targets), dtype=torch.float64)
        self.phi = torch.zeros(len(targets), dtype=torch.float64)
        self.thresholds = torch.zeros(len(targets), dtype=torch.float64)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.start = resolve_step(c.start_itr, c.start_fraction, total_steps)
        self.ramp = max(self.start, resolve_step(c.ramp_itr, c.ramp_fraction, total_steps))
        self.end = max(self.ramp, resolve_step(c.end_itr, c.end_fraction, total_steps))

    def slopes(self, q: float) -> tuple[float, float]:
        """(theta, phi) from the paper's heuristic, unless the recipe gives them."""
        c = self.config
        theta = c.start_slope or 2 * q * c.freq / max(2 * (self.ramp - self.start) + 3 * (self.end - self.ramp), 1)
        return theta, c.ramp_slope or c.ramp_ratio * theta

    def threshold(self, itr: int, theta: float, phi: float) -> float:
        """The paper's eps(itr)."""
        f = self.config.freq
        if itr < self.ramp:
            return theta * (itr - self.start + 1) / f
        return (theta * (self.ramp - self.start + 1) + phi * (itr - self.ramp + 1)) / f

    def is_update_step(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.config.freq == 0)

    def after_backward(self, step: int) -> None:
        self.mask_grads()

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        if not self.is_update_step(step):
            self.zero_masked()
            return
        if step == self.start and self.target_density is None:
            for i, t in enumerate(self.targets):
                q = float(torch.quantile(t.param.detach().abs().flatten().double(), self.config.q_percentile / 100))
                self.theta[i], self.phi[i] = self.slopes(q)
        for i, (t, mask) in enumerate(zip(self.targets, self.masks)):
            w = t.param.detach().abs()
            if self.target_density is None:
                eps = self.threshold(step, float(self.theta[i]), float(self.phi[i]))
                mask &= w > eps
            else:
                k = round(self.target_density * w.numel())
                if step == self.end:
                    mask.copy_(topk_mask(w, k))
                    eps = kth_largest(w, k)
                else:
                    theta, phi = self.slopes(1.0)  # shape only: eps(itr) / eps(end) is independent of q
                    eps = self.threshold(step, theta, phi) / self.threshold(self.end, theta, phi) * kth_largest(w, k)
                    mask &= w > eps
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
