"""Step arithmetic shared by the scheduled methods."""

from __future__ import annotations

import torch


def resolve_step(step: int | None, fraction: float, total_steps: int) -> int:
    """An explicit step wins; otherwise ``fraction`` of the run's optimizer steps."""
    return step if step is not None else int(round(fraction * total_steps))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly the ``k`` largest ``scores`` (ties broken by index, deterministically)."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def kth_largest(scores: torch.Tensor, k: int) -> float:
    """The k-th largest value (k >= 1): keeping ``scores >= it`` keeps about k entries."""
    flat = scores.flatten()
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values) if k > 0 else float("inf")
