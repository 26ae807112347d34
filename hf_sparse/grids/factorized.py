"""``factorized`` (l0 only): gates on the rank-1 components of a factorised Linear
``W = P diag(z) Q`` (Wang et al. 2020); the grid covers the whole weight, the method owns P and Q."""

from __future__ import annotations

from dataclasses import dataclass

from .granularity import Granularity, register_granularity


@register_granularity
@dataclass(frozen=True)
class Factorized(Granularity):
    name = "factorized"
    help = "factorized (l0 only)"
    low_rank = True

    def target_problem(self, target):
        if target.param.dim() != 2:
            return f"factorized gates need 2-D weights; {target.name} has shape {tuple(target.shape)}"
        return None

    def shard_rows(self, grid, chunks):
        raise ValueError("l0 with factorized gates does not support FSDP2-sharded parameters yet")
