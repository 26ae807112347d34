"""The real-weight copy of methods whose trained value differs from the weight the model sees.

DNS trains the dense ``W`` under the mask, L0 trains ``W`` under its gates and AutoPrune keeps
pruned weights' values for recovery. Between steps the model's parameters hold the *effective*
weight (``W * mask``, ``W * z``) - what evaluation, prediction and checkpoints see - and the real
values live here. Parameters are never replaced, so optimizers, DDP and the flat weights of
recurrent modules keep seeing the same tensors.

Memory: one extra copy of every covered tensor, i.e. 4 bytes per fp32 weight (2 for bf16).
"""

from __future__ import annotations

import torch

from ..grids import Target


class RealWeights:
    """The real values of ``targets`` (weights and companions such as biases or BatchNorm)."""

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.values = [t.param.detach().clone() for t in targets]

    def follow(self) -> None:
        """Move the copies where the parameters are (after ``model.to(device)`` or a dtype change)."""
        for i, t in enumerate(self.targets):
            p = t.param
            if self.values[i].device != p.device or self.values[i].dtype != p.dtype:
                self.values[i] = self.values[i].to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the real values into the parameters (so the optimizer steps them)."""
        for t, v in zip(self.targets, self.values):
            t.param.copy_(v)

    @torch.no_grad()
    def store(self, where: list[torch.Tensor] | None = None) -> None:
        """Take the parameters' values as the real ones; with ``where`` (0/1 floats) only there."""
        for i, (t, v) in enumerate(zip(self.targets, self.values)):
            if where is None:
                v.copy_(t.param)
            else:
                v.lerp_(t.param, where[i])  # exact for 0/1 weights: keeps v where 0, takes param where 1

    @torch.no_grad()
    def write(self, factors: list[torch.Tensor | None]) -> None:
        """Write ``real * factor`` (the effective weight) into each parameter; ``None`` writes the real value."""
        for t, v, f in zip(self.targets, self.values, factors):
            if f is None:
                t.param.copy_(v)
            else:
                torch.mul(v, f, out=t.param)

    def state_dict(self) -> list[torch.Tensor]:
        return [v.clone() for v in self.values]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.values):
            raise ValueError(f"state holds {len(state)} real-weight tensors, the method covers {len(self.values)}")
        for v, s in zip(self.values, state):
            v.copy_(s)
