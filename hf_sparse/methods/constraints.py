"""Lagrangian control of constraints ``g_i(theta) <= 0`` (Gallego-Posada et al. 2022).

The primal problem ``min_theta L(theta) s.t. g(theta) <= 0`` becomes the min-max game
``min_theta max_{lambda >= 0} L(theta) + lambda . g(theta)``. The primal side (weights, gates) is
trained by Trainer's optimizer on the Lagrangian; this controller does the dual side: plain
gradient *ascent* on the multipliers, ``lambda <- max(0, lambda + lr * g)`` (projected SGD on the
flipped gradient), with optional *dual restarts*: a multiplier whose constraint holds is reset to 0
so the pressure stops as soon as the target is met.

The multipliers live here, not in the model or Trainer's optimizer, so weight decay, gradient
clipping and LR schedules never touch them. Their state is a tensor plus a step count, saved with
the method's state in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch


class LagrangianController:
    """Projected dual ascent on ``num_constraints`` multipliers, all starting at 0."""

    def __init__(self, num_constraints: int, dual_lr: float, dual_restarts: bool = False):
        if dual_lr <= 0:
            raise ValueError(f"dual_lr must be > 0, got {dual_lr}")
        self.dual_lr = dual_lr
        self.dual_restarts = dual_restarts
        self.multipliers = torch.zeros(num_constraints, dtype=torch.float64)
        self.steps = 0

    def lagrangian_term(self, violations: torch.Tensor) -> torch.Tensor:
        """``lambda . g``: add to the primal loss (its gradient is ``lambda * dg/dtheta``)."""
        return (self.multipliers.to(violations) * violations).sum()

    @torch.no_grad()
    def step(self, violations: torch.Tensor) -> None:
        """One dual ascent step with the constraint values ``g`` measured at this primal step."""
        g = violations.detach().to(self.multipliers)
        self.multipliers.add_(self.dual_lr * g).clamp_(min=0.0)
        if self.dual_restarts:
            self.multipliers[g <= 0] = 0.0
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"multipliers": self.multipliers.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.multipliers.copy_(state["multipliers"])
        self.steps = int(state["steps"])


class AugmentedLagrangianController:
    """Wang, Wohlwend & Lei (2020): ``lambda1 * gap + lambda2 * gap^2`` with both trained by ascent.

    ``gap = s - t`` is an *equality* constraint (expected sparsity ``s`` should equal the target
    ``t``), so ``lambda1`` has no sign restriction and pushes from whichever side the gap is on;
    ``lambda2`` only grows (its gradient ``gap^2`` is never negative) and turns the term into an
    ever stiffer quadratic pull toward the target. One pair per constraint.
    """

    def __init__(self, num_constraints: int, dual_lr: float):
        if dual_lr <= 0:
            raise ValueError(f"dual_lr must be > 0, got {dual_lr}")
        self.dual_lr = dual_lr
        self.lambda1 = torch.zeros(num_constraints, dtype=torch.float64)
        self.lambda2 = torch.zeros(num_constraints, dtype=torch.float64)
        self.steps = 0

    def lagrangian_term(self, gaps: torch.Tensor) -> torch.Tensor:
        """``sum lambda1 * gap + lambda2 * gap^2``: add to the primal loss."""
        return (self.lambda1.to(gaps) * gaps + self.lambda2.to(gaps) * gaps**2).sum()

    @torch.no_grad()
    def step(self, gaps: torch.Tensor) -> None:
        """One ascent step on both multipliers with the gaps measured at this primal step."""
        g = gaps.detach().to(self.lambda1)
        self.lambda1.add_(self.dual_lr * g)
        self.lambda2.add_(self.dual_lr * g**2)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"lambda1": self.lambda1.clone(), "lambda2": self.lambda2.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lambda1.copy_(state["lambda1"])
        self.lambda2.copy_(state["lambda2"])
        self.steps = int(state["steps"])
