"""Group grids over FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 over a 1-D device mesh: rank ``r``
holds rows ``[r * c, (r + 1) * c)`` of it (``c = ceil(rows / world)``, ``torch.chunk``'s split).
A method built *after* wrapping (targets resolved by name on the wrapped model) works on those
local rows only:

* :attr:`~.targets.Target.param` is this rank's shard (a view of FSDP's sharded storage, so the
  in-place writes of the effective-weight scheme reach the next all-gather) and
  :attr:`~.targets.Target.grad` its reduce-scattered gradient;
* every grid is built on the local rows, so masks, real-weight copies, gate logits and their Adam
  moments are shards too. Dim-0 sharding keeps single weights, N:M runs (they lie along dim 1),
  output units and blocks whose row count divides the shard whole, so each rank's groups are
  complete groups; each granularity says how its group rows follow the shard
  (:meth:`~.granularity.Granularity.shard_rows`) or refuses it;
* every quantity defined over a whole layer or model is computed from reduced shard statistics,
  so all ranks agree exactly and agree with one process: top-k selections and thresholds gather
  the group *scores* of the grid being selected (one layer at a time; all layers at once for
  ``scope: global``), run the one-process selection on them and keep their own rows; sums
  (E[L0], counts, DNS's mean/std) are all-reduced; the Hard Concrete noise is counter-based (a
  hash of each element's flat index and the step's keys), so a shard computes its own slice of the
  one-process noise; the gate initialisation is drawn at the full shape from the step generator
  and sliced, so it equals the one-process draw.

This module holds the layout and the collectives; :class:`~.grid.GroupGrid` uses them so that an
unsharded grid takes the same code path (every collective is then the identity). The gathered
scores are transient (4 bytes per group of the grid being selected, at mask updates only): for
``scope: layer`` no more than FSDP's own all-gather of that layer's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor: nothing is ever sharded
    DTensor, Shard = None, None

if TYPE_CHECKING:
    from .grid import GroupGrid


def is_sharded(x: Any) -> bool:
    """Whether ``x`` is a DTensor (an FSDP2 parameter or gradient)."""
    return DTensor is not None and isinstance(x, DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the stored local tensor itself, so in-place writes land in
    the parameter), or ``x`` unchanged. ``DTensor.to_local`` returns a new view object per call."""
    return x._local_tensor if is_sharded(x) else x


def chunk_rows(rows: int, world: int) -> list[int]:
    """Rows of a dim-0 FSDP2 shard on each rank (``torch.chunk``; trailing ranks may get none)."""
    sizes = [len(c) for c in torch.arange(rows).chunk(world)]
    return sizes + [0] * (world - len(sizes))


@dataclass
class ShardLayout:
    """How one group grid is split over the ranks: which group rows each rank holds."""

    group: Any  # the process group of the FSDP mesh
    rank: int
    world: int
    rows: list[int]  # rows of the group-shaped tensors held by each rank
    full_shape: tuple[int, ...]  # the whole grid's group shape
    total_numel: int  # weights behind the whole grid
    uniform: bool  # every group of the whole grid covers the same number of weights
    size0: float  # that number (when uniform)

    @property
    def offset(self) -> int:
        return sum(self.rows[: self.rank])

    @property
    def total_num(self) -> int:
        return math.prod(self.full_shape)


def layout_for(grid: GroupGrid) -> ShardLayout | None:
    """The shard layout of ``grid`` (None when its tensors are not sharded); raises ``ValueError``
    for a sharding the methods cannot follow exactly."""
    params = [m.target.parameter for m in grid.members]
    flags = [is_sharded(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError(f"{grid.name}: some tensors of the group grid are FSDP2-sharded and some are not")
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or any(p.device_mesh != mesh or tuple(p.placements) != (Shard(0),) for p in params):
        raise ValueError(f"{grid.name}: sparsity under FSDP2 needs a 1-D mesh with dim-0 sharding "
                         "(fully_shard's default); HSDP and custom shard placements are not supported")
    world, rank = mesh.size(), mesh.get_local_rank()
    chunks = chunk_rows(params[0].shape[0], world)
    for m, p in zip(grid.members, params):
        if chunk_rows(p.shape[0], world) != chunks or m.param.shape[0] != chunks[rank]:
            raise ValueError(f"{grid.name}: {m.target.name} is split over the ranks unlike the rest of its group")
    if 0 in chunks:
        raise ValueError(f"{grid.name}: {params[0].shape[0]} rows cannot give each of {world} FSDP2 ranks a share")
    rows = grid.granularity.shard_rows(grid, chunks)
    extremes = torch.tensor([float(grid.sizes.min()), -float(grid.sizes.max())], dtype=torch.float64,
                            device=grid.sizes.device)
    group = mesh.get_group()
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN, group=group)
    lo, hi = float(extremes[0]), -float(extremes[1])
    return ShardLayout(group, rank, world, rows, (sum(rows), *grid.shape[1:]),
                       sum(p.numel() for m, p in zip(grid.members, params) if m.scored), lo == hi, lo)


# -- whole-grid views (the identity without a layout) --------------------------------------------
def gather(lay: ShardLayout | None, x: torch.Tensor) -> torch.Tensor:
    """A group-shaped local tensor -> the whole grid's tensor, on every rank."""
    if lay is None:
        return x
    dtype = x.dtype
    if dtype == torch.bool:
        x = x.to(torch.uint8)
    buf = x.new_zeros((max(lay.rows), *x.shape[1:]))
    buf[: x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(lay.world)]
    dist.all_gather(parts, buf, group=lay.group)
    return torch.cat([p[:n] for p, n in zip(parts, lay.rows)]).to(dtype)


def local_rows(lay: ShardLayout | None, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a whole-grid tensor (a new tensor: the whole one can be freed)."""
    return full if lay is None else full[lay.offset: lay.offset + lay.rows[lay.rank]].clone()


# -- reductions ------------------------------------------------------------------------------
def _group(grids: Sequence[GroupGrid]) -> Any:
    groups = {id(g.shard.group): g.shard.group for g in grids if g.shard is not None}
    if len(groups) > 1:
        raise ValueError("the targets are sharded over different FSDP2 meshes")
    return next(iter(groups.values()), None)


def sum_across(grids: Sequence[GroupGrid], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per grid, the sum of a scalar over all shards; differentiable in this rank's part.

    The value is the whole grid's (identical on every rank); the gradient is that of the local
    term, which is what each rank's local logits need. Unsharded grids pass through.
    """
    group = _group(grids)
    if group is None:
        return list(values)
    sharded = [i for i, g in enumerate(grids) if g.shard is not None]
    mine = torch.stack([values[i].detach().to(torch.float64) for i in sharded])
    total = mine.clone()
    dist.all_reduce(total, group=group)
    out = list(values)
    for j, i in enumerate(sharded):
        out[i] = values[i] + (total[j] - mine[j]).to(values[i].dtype)
    return out


def sum_floats(grids: Sequence[GroupGrid], values: Sequence[float]) -> list[float]:
    """Per grid, a float summed over the shards (float64); unsharded grids pass through."""
    # on the parameters' device: an nccl group reduces CUDA tensors only
    device = next((g.sizes.device for g in grids if g.shard is not None), None)
    tensors = sum_across(grids, [torch.tensor(float(v), dtype=torch.float64, device=device) for v in values])
    return [float(t) for t in tensors]


def mean_std(lay: ShardLayout, a: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased standard deviation of a sharded grid's group scores (float64 sums)."""
    moments = torch.stack([a.double().sum(), a.double().square().sum()])
    dist.all_reduce(moments, group=lay.group)
    n = lay.total_num
    mean = float(moments[0]) / n
    var = max(float(moments[1]) - n * mean * mean, 0.0) / max(n - 1, 1)
    return mean, math.sqrt(var)


def sum_counts(params: Sequence[torch.Tensor], counts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Integer counts per tensor summed over the ranks when the tensors are sharded."""
    sharded = [is_sharded(p) for p in params]
    if not any(sharded):
        return [list(c) for c in counts]
    if not all(sharded):
        raise ValueError("some targets are FSDP2-sharded and some are not")
    t = torch.tensor([list(c) for c in counts], dtype=torch.int64, device=local(params[0]).device)
    dist.all_reduce(t, group=params[0].device_mesh.get_group())
    return t.tolist()
