"""``"N:M"`` (e.g. ``"2:4"``): exactly N of every M consecutive weights along the input dimension
(input channels of a conv) are kept. Groups are single weights, but every selection that keeps the
"best" weights keeps the best N of each M; the density is fixed at N/M."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .granularity import Granularity, register_granularity

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@register_granularity
@dataclass(frozen=True)
class NM(Granularity):
    name = "n:m"
    help = "'N:M' such as '2:4'"
    pooled = False  # selection is per run of M, never across grids
    n: int = 2
    m: int = 4

    @classmethod
    def claims(cls, text: str) -> bool:
        return _NM.match(text) is not None

    @classmethod
    def from_text(cls, text, block_shape):
        match = _NM.match(text)
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {text!r}")
        return cls(n=n, m=m)

    @property
    def fixed_density(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def target_problem(self, target):
        width = target.shape[1] if target.param.dim() > 1 else 1
        if width % self.m:
            return f"N:M needs each target's input dimension divisible by M={self.m}; {target.name} has {width}"
        return None

    def mask_problem(self, weight, units=None):
        if bool((nm_count(weight != 0, self.m) > self.n).any()):
            return f"more than {self.n} of {self.m} kept in some run"
        return None

    def select(self, grid, scores, density):
        return nm_mask(scores, self, density)

    def keep_count(self, grid, values, k):
        return nm_mask(values, self)

    def prune_below(self, grid, kept, scores, eps, density):
        if density is None:
            return kept & (scores > eps)
        # never below N of M: the best N kept weights of each run stay
        return kept & ((scores > eps) | self.select(grid, scores * kept, density))

    def hysteresis(self, grid, scores, kept, t, band, density):
        return self.select(grid, scores, density)  # a band cannot hold N of M: keep the N largest


def nm_mask(scores: torch.Tensor, granularity: NM, density: float | None = None) -> torch.Tensor:
    """Keep the best ``round(density * M)`` (default N) of every M consecutive entries along the
    input dimension (dim 1; for a conv, M consecutive input channels at each kernel position)."""
    m = granularity.m
    k = granularity.n if density is None else min(m, max(granularity.n, round(density * m)))
    moved = scores.movedim(1, -1) if scores.dim() > 2 else scores
    runs = moved.reshape(-1, m)
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(1, torch.topk(runs, k, dim=1, sorted=False).indices, True)
    keep = keep.view(moved.shape)
    return keep.movedim(-1, 1) if scores.dim() > 2 else keep


def nm_count(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept entries in every run of M along the input dimension."""
    moved = mask.movedim(1, -1) if mask.dim() > 2 else mask
    return moved.reshape(-1, m).sum(1)
