"""Group grids: one mask, gate or score tensor over the tensors it covers, FSDP2-aware.

A :class:`GroupGrid` reduces per-entry values to per-group values (``sum`` or ``max``; the scores
``l1``, ``mean``, ``l2``, ``max``), expands a per-group tensor back onto each tensor, counts the
weights behind each group (``sizes``) and selects the best groups under a weight budget. Whether
its tensors are FSDP2 shards is its own business: whole-grid quantities (selections, thresholds,
counts, statistics) are computed over every rank, with one code path (each collective is the
identity for an unsharded grid), so all ranks and one process agree exactly.

Rankings are stable sorts, so ties go to the lower position and every rank and every resumed run
makes the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from . import shards
from .shards import ShardLayout, layout_for
from .targets import Target
from .tilings import Tiling

if TYPE_CHECKING:
    from .granularity import Granularity


@dataclass
class Member:
    """One tensor under a grid: a targeted weight (scored and counted) or a companion of its units."""

    target: Target
    tiling: Tiling
    role: Literal["weight", "bias", "norm"] = "weight"

    @property
    def scored(self) -> bool:
        return self.role == "weight"

    @property
    def param(self) -> nn.Parameter:
        return self.target.param

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        """A group-shaped tensor broadcast onto this member (a view where possible)."""
        return self.tiling.expand(g)

    def full(self, g: torch.Tensor) -> torch.Tensor:
        """A group-shaped tensor expanded to this member's full shape (a new tensor)."""
        return self.tiling.expand(g).expand(self.param.shape).clone()


@dataclass
class GroupGrid:
    """One grid of groups and the tensors it covers (its targeted weights first)."""

    name: str
    granularity: Granularity
    members: list[Member]
    #: ``group`` granularity: the coupled channel group the grid gates (for purging and cost models).
    channel_group: Any = field(default=None, repr=False)
    shape: tuple[int, ...] = field(init=False)
    sizes: torch.Tensor = field(init=False, repr=False)  # weights behind each group (float32)
    #: FSDP2: how the grid is split over the ranks (shape, sizes, numel, num are then this rank's rows).
    shard: ShardLayout | None = field(init=False, repr=False)

    def __post_init__(self):
        self.shape = self.members[0].tiling.group_shape
        device = self.members[0].param.device
        if self.single:
            # one weight per group: a broadcast 1, not a float per weight (4 bytes per targeted weight)
            self.sizes = torch.ones((), device=device).expand(self.shape)
        else:
            ones = [torch.ones(m.param.shape, device=device) for m in self.weights]
            self.sizes = self.reduce(ones, "sum")
        self.shard = layout_for(self)
        self.uniform = self.shard.uniform if self.shard else bool(self.sizes.min() == self.sizes.max())

    @property
    def weights(self) -> list[Member]:
        return [m for m in self.members if m.scored]

    @property
    def single(self) -> bool:
        """Whether each group is one weight (one targeted tensor, tiled entrywise)."""
        weights = self.weights
        return len(weights) == 1 and weights[0].tiling.entrywise

    def follow(self, device: torch.device) -> None:
        """Move ``sizes`` to ``device``, keeping a broadcast 1 a broadcast (``.to`` would materialise it)."""
        if self.sizes.device != device:
            small = self.sizes.stride() == (0,) * self.sizes.dim() and self.sizes.dim() > 0
            self.sizes = (torch.ones((), device=device).expand(self.shape) if small
                          else self.sizes.to(device))

    @property
    def numel(self) -> int:
        return sum(m.param.numel() for m in self.weights)

    @property
    def num(self) -> int:
        return math.prod(self.shape)

    @property
    def total_numel(self) -> int:
        """Weights behind the whole grid, on all ranks (= ``numel`` unless FSDP2-sharded)."""
        return self.numel if self.shard is None else self.shard.total_numel

    @property
    def total_num(self) -> int:
        """Groups of the whole grid, on all ranks (= ``num`` unless FSDP2-sharded)."""
        return self.num if self.shard is None else self.shard.total_num

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The whole grid's group shape (= ``shape`` unless FSDP2-sharded)."""
        return self.shape if self.shard is None else self.shard.full_shape

    @property
    def offset(self) -> int:
        """Flat index of this rank's first group in the whole grid (0 unless FSDP2-sharded)."""
        return 0 if self.shard is None else self.shard.offset * math.prod(self.shard.full_shape[1:])

    # -- per-entry values -> groups -------------------------------------------------------------
    def reduce(self, values: list[torch.Tensor], op: Literal["sum", "max"] = "sum") -> torch.Tensor:
        """Per-entry values of the weight members (in their order) -> one value per group."""
        out = None
        for m, v in zip(self.weights, values):
            r = m.tiling.reduce(v, op)
            out = r if out is None else (out + r if op == "sum" else torch.maximum(out, r))
        return out

    def score(self, values: list[torch.Tensor], how: Literal["l1", "mean", "l2", "max"]) -> torch.Tensor:
        """A group score from per-entry values (e.g. the weights): L1/L2 norm, mean or max of |v|."""
        if len(values) == 1 and self.single:
            return values[0].abs()  # one weight per group: every score is |w|
        if how == "l2":
            return self.reduce([v.float().square() for v in values]).sqrt()
        if how == "max":
            return self.reduce([v.abs() for v in values], "max")
        total = self.reduce([v.abs().float() for v in values])
        return total / self.sizes if how == "mean" else total

    def weights_behind(self, flags: torch.Tensor) -> float:
        """Weights behind the True groups of ``flags`` on this rank (companions not counted)."""
        return float(flags.count_nonzero()) if self.single else float((self.sizes * flags).sum())

    # -- the whole grid over every rank ---------------------------------------------------------
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """A group-shaped tensor of this rank -> the whole grid's, on every rank."""
        return shards.gather(self.shard, x)

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-grid tensor."""
        return shards.local_rows(self.shard, full)

    def local_sample(self, draw: Callable[[tuple[int, ...]], torch.Tensor]) -> torch.Tensor:
        """``draw`` at the whole grid's shape, this rank's rows: the one-process random stream."""
        return self.local_rows(draw(self.full_shape))

    def full_sizes(self) -> torch.Tensor:
        """``sizes`` of the whole grid."""
        lay = self.shard
        if lay is None:
            return self.sizes
        if lay.uniform:
            return torch.full(lay.full_shape, lay.size0, dtype=self.sizes.dtype, device=self.sizes.device)
        return self.gather(self.sizes)

    def host(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the CPU for a selection, unless the grid's collectives need it on its device."""
        return x.cpu() if self.shard is None else x

    def mean_std(self, a: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Mean and unbiased standard deviation of the whole grid's group scores ``a``."""
        if self.shard is None:
            return a.mean(), a.std()
        return shards.mean_std(self.shard, a)

    # -- selection ------------------------------------------------------------------------------
    def select(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Boolean group mask keeping the best groups: ``density`` of the weights, by the
        granularity's rule (N:M: per M)."""
        return self.granularity.select(self, scores, density)

    def top(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """The best groups holding ``density`` of the whole grid's weights; this rank's rows."""
        keep = top_by_size(self.gather(scores).flatten(), self.full_sizes().flatten(), density * self.total_numel)
        return self.local_rows(keep.view(self.full_shape))

    def threshold(self, scores: torch.Tensor, density: float) -> float:
        """The score of the last group that :meth:`top` keeps (``inf`` when it keeps none)."""
        return threshold_of(self.gather(scores).flatten(), self.full_sizes().flatten(), density * self.total_numel)

    def top_k(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """Boolean mask of the ``k`` largest ``values`` of the whole grid; this rank's rows."""
        full = self.gather(values)
        return self.local_rows(top_k_mask(full.flatten(), k).view(full.shape))

    def keep_count(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """Keep ``k`` groups by ``values`` as the granularity's rule allows (N:M: the N best per M)."""
        return self.granularity.keep_count(self, values, k)

    def prune_below(self, kept: torch.Tensor, scores: torch.Tensor, eps: float,
                    density: float | None = None) -> torch.Tensor:
        """``kept`` less the groups scoring at most ``eps``, as the granularity's rule allows
        (N:M with a ``density``: never below the best kept of each run)."""
        return self.granularity.prune_below(self, kept, scores, eps, density)

    def hysteresis(self, scores: torch.Tensor, kept: torch.Tensor, t: float, band: tuple[float, float],
                   density: float | None = None) -> torch.Tensor:
        """Keep while above ``band[0] * t``, revive above ``band[1] * t`` (a fixed-density rule
        selects instead)."""
        return self.granularity.hysteresis(self, scores, kept, t, band, density)


# -- building and checking -------------------------------------------------------------------
def build_grids(targets: list[Target], granularity: Granularity, model: nn.Module | None = None,
                batchnorm: bool = True) -> list[GroupGrid]:
    """The group grids over ``targets`` (in target order); ``model`` lets channel grids take the
    BatchNorm that follows a layer as a companion (when ``batchnorm``) and group grids find their
    coupled channel groups."""
    return granularity.build(targets, model, batchnorm)


def target_problem(targets: list[Target], granularity: Granularity) -> str | None:
    """Why ``granularity`` cannot apply to these targets (a message naming the tensor), or None."""
    return next((p for t in targets if (p := granularity.target_problem(t)) is not None), None)


def check_mask_rule(weight: torch.Tensor, granularity: Granularity, units: int | None = None) -> str | None:
    """Check the granularity's shape rule on a weight's zeros; a message if it is broken."""
    return granularity.mask_problem(weight, units)


def refuse_split(grids: Sequence[GroupGrid], message: str) -> None:
    """Raise ``ValueError(message)`` when a grid is split over FSDP2 ranks (for code that has no
    whole-grid path yet)."""
    if any(g.shard is not None for g in grids):
        raise ValueError(message)


# -- selection over several grids ------------------------------------------------------------
def keep_top(grids: list[GroupGrid], scores: list[torch.Tensor], density: float,
             scope: Literal["layer", "global"] = "layer") -> list[torch.Tensor]:
    """Boolean group masks keeping the best-scoring groups: ``density`` of the weights per grid
    (``layer``) or of all grids together (``global``; grids whose rule is per run, N:M, always
    select per grid)."""
    if scope == "layer" or not all(g.granularity.pooled for g in grids):
        return [g.select(s, density) for g, s in zip(grids, scores)]
    flat, sizes, numel = _pooled(grids, scores)
    keep = top_by_size(flat, sizes, density * numel)
    parts = keep.split([math.prod(g.full_shape) for g in grids])
    return [g.local_rows(k.view(g.full_shape)) for k, g in zip(parts, grids)]


def thresholds(grids: list[GroupGrid], scores: list[torch.Tensor], density: float,
               scope: Literal["layer", "global"] = "layer") -> list[float]:
    """Per grid, the score of the last group :func:`keep_top` keeps (``global``: one shared value)."""
    if scope == "layer":
        return [g.threshold(s, density) for g, s in zip(grids, scores)]
    flat, sizes, numel = _pooled(grids, scores)
    return [threshold_of(flat, sizes, density * numel)] * len(grids)


def _pooled(grids: list[GroupGrid], scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All grids' scores and group sizes (whole grids) as one flat ranking, and the weights behind them."""
    flat = torch.cat([g.gather(s).flatten().float() for g, s in zip(grids, scores)])
    sizes = torch.cat([g.full_sizes().flatten().to(flat.device) for g in grids])
    return flat, sizes, sum(g.total_numel for g in grids)


# -- sums over the ranks -----------------------------------------------------------------------
def sum_over_ranks(grids: Sequence[GroupGrid], values: Sequence[float]) -> list[float]:
    """Per grid, a float summed over the FSDP2 ranks (unchanged for unsharded grids)."""
    return shards.sum_floats(grids, values)


def sum_over_ranks_differentiable(grids: Sequence[GroupGrid], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per grid, a scalar tensor summed over the ranks; the gradient is that of this rank's term."""
    return shards.sum_across(grids, values)


def kept_weights(grids: Sequence[GroupGrid], flags: Sequence[torch.Tensor]) -> float:
    """Weights behind the True groups of per-grid ``flags``, over all ranks."""
    return sum(sum_over_ranks(grids, [g.weights_behind(f) for g, f in zip(grids, flags)]))


def density_of(grids: list[GroupGrid], masks: list[torch.Tensor]) -> float:
    """Kept fraction of the weights behind group masks (not counting companions), of the whole grids."""
    return kept_weights(grids, masks) / sum(g.total_numel for g in grids)


# -- rankings ----------------------------------------------------------------------------------
def _ranking(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> tuple[torch.Tensor, int]:
    """Flat groups ranked best first, and how many of them to keep for ``budget`` weights.

    Equal-sized groups: exactly ``round(budget / size)``. Otherwise the count whose sizes, taken
    in order, come closest to the budget.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    if bool(sizes.min() == sizes.max()):
        return order, round(budget / float(sizes[0]))
    counts = torch.cat([sizes.new_zeros(1, dtype=torch.float64), torch.cumsum(sizes[order].double(), 0)])
    return order, int(torch.argmin((counts - budget).abs()))


def threshold_of(flat: torch.Tensor, sizes: torch.Tensor, budget: float) -> float:
    """The score of the last group that keeping ``budget`` weights keeps (``inf`` when none)."""
    order, n = _ranking(flat, sizes, budget)
    return float(flat[order[n - 1]]) if n > 0 else float("inf")


def top_by_size(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> torch.Tensor:
    """Boolean mask of the best flat groups for ``budget`` weights (see :func:`_ranking`)."""
    order, n = _ranking(scores, sizes, budget)
    return _first(order, n, scores)


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest flat ``values`` (stable: ties to the lower position)."""
    return _first(torch.argsort(values, descending=True, stable=True), k, values)


def _first(order: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    keep[order[:n]] = True
    return keep
