"""The granularity layer: which entries of the targeted tensors are kept or removed together.

Every method scores, masks or gates *groups* of entries; this module owns what a group is, so each
method works at every granularity with one code path:

* ``unstructured``: every weight is its own group.
* ``block`` (``block_shape: [r, c]``): r x c tiles of the weight viewed as a matrix
  ``(out, in * kh * kw)``; tiles at the right/bottom edge may be smaller.
* ``"N:M"`` (e.g. ``"2:4"``): exactly N of every M consecutive weights along the input dimension
  (input channels of a conv) are kept. Groups are single weights, but every selection that keeps
  the "best" weights keeps the best N of each M; the density is fixed at N/M.
* ``channel`` (aliases ``neuron``, ``unit``): output rows - a conv's output channel, a Linear's
  output unit, a recurrent layer's hidden unit. A hidden unit's group holds its rows in every gate
  block of both ``weight_ih_lK`` and ``weight_hh_lK`` (one group grid per layer and direction).
  Its *companions* follow it: the unit's biases and, where an affine BatchNorm normalises the
  layer's output, that BatchNorm's weight and bias, so a removed channel emits exactly zero.
* ``group``: coupled channel groups (:func:`hf_sparse.structure.groups.find_groups`): the channels
  that a residual add, a depthwise conv, an attention head or a recurrent unit ties together, one
  group per channel over every tensor that produces it (weights, biases, norms, layer scales).
  A targeted weight that no group produces (a layer that keeps its width: the stem, the head,
  anything tied to them) stays dense; densities count the grouped weights.

A :class:`GroupGrid` is one grid of groups (one mask, gate or score tensor) and the tensors it
covers. It reduces per-entry values to per-group values (``sum`` or ``max``; the scores ``l1``,
``mean``, ``l2``, ``max``), expands a per-group tensor back onto each tensor, counts the weights
behind each group (``sizes``), and selects the best groups under a weight budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from . import sharding
from .sharding import ShardLayout, layout_for
from .targets import Target

Kind = Literal["unstructured", "block", "n:m", "channel", "group", "factorized"]
#: Spellings of ``sparsity.granularity`` that mean ``channel``.
CHANNEL_ALIASES = ("channel", "neuron", "unit")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_RECURRENT = re.compile(r"^weight_(?:ih|hh)_(l\d+(?:_reverse)?)$")


@dataclass(frozen=True)
class Granularity:
    """A parsed ``sparsity.granularity`` (+ ``block_shape``)."""

    kind: Kind = "unstructured"
    block: tuple[int, int] | None = None
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, value: str, block_shape: list[int] | tuple[int, ...] | None = None) -> Granularity:
        """Raise ``ValueError`` with a user-facing message for a bad combination."""
        text = str(value).strip()
        if block_shape is not None and text != "block":
            raise ValueError(f"block_shape is only used with granularity 'block', not {text!r}")
        if text == "block":
            if block_shape is None:
                raise ValueError("granularity 'block' needs sparsity.block_shape, e.g. [4, 4]")
            if len(block_shape) != 2 or any(int(b) < 1 for b in block_shape):
                raise ValueError(f"block_shape must be two positive integers [rows, cols], got {list(block_shape)}")
            return cls("block", block=(int(block_shape[0]), int(block_shape[1])))
        if match := _NM.match(text):
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"N:M needs 0 < N < M, got {text!r}")
            return cls("n:m", n=n, m=m)
        if text in CHANNEL_ALIASES:
            return cls("channel")
        if text in ("unstructured", "factorized", "group"):
            return cls(text)  # type: ignore[arg-type]
        raise ValueError(f"unknown granularity {text!r}; allowed: unstructured, block (with block_shape), "
                         f"'N:M' such as '2:4', channel (neuron, unit), group (coupled channel groups), "
                         f"factorized (l0 only)")

    @property
    def structured(self) -> bool:
        """Whether groups are whole output units (the model can be purged to a smaller one)."""
        return self.kind in ("channel", "group")

    @property
    def fixed_density(self) -> float | None:
        """N:M fixes the density at N/M; other granularities take the recipe's target."""
        return self.n / self.m if self.kind == "n:m" else None

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block {self.block[0]}x{self.block[1]}"
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


UNSTRUCTURED = Granularity()


# -- how one tensor's entries map onto a grid ----------------------------------------------------
class _Entries:
    """Each entry is its own group (unstructured, N:M)."""

    def __init__(self, shape: torch.Size):
        self.group_shape = tuple(shape)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        return g


class _Blocks:
    """r x c tiles of the tensor viewed as ``(shape[0], prod(shape[1:]))``; edge tiles may be partial."""

    def __init__(self, shape: torch.Size, block: tuple[int, int]):
        self.shape = shape
        self.rows, self.cols = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
        self.r, self.c = block
        self.group_shape = (math.ceil(self.rows / self.r), math.ceil(self.cols / self.c))

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        gr, gc = self.group_shape
        padded = x.new_zeros(gr * self.r, gc * self.c)  # scores are >= 0, so zero padding is neutral
        padded[: self.rows, : self.cols] = x.reshape(self.rows, self.cols)
        tiles = padded.view(gr, self.r, gc, self.c)
        return tiles.sum((1, 3)) if op == "sum" else tiles.amax((1, 3))

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        gr, gc = self.group_shape
        full = g[:, None, :, None].expand(gr, self.r, gc, self.c).reshape(gr * self.r, gc * self.c)
        return full[: self.rows, : self.cols].reshape(self.shape)


class _Rows:
    """Output rows: ``blocks`` stacked blocks (recurrent gates) of ``units`` rows each."""

    def __init__(self, shape: torch.Size, units: int):
        if shape[0] % units:
            raise ValueError(f"{shape[0]} rows do not split into blocks of {units} units")
        self.blocks, self.units, self.ndim = shape[0] // units, units, len(shape)
        self.group_shape = (units,)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        x = x.reshape(self.blocks, self.units, -1)
        return x.sum((0, 2)) if op == "sum" else x.amax((0, 2))

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        g = g.repeat(self.blocks) if self.blocks > 1 else g
        return g.view(-1, *([1] * (self.ndim - 1)))


class _Slices:
    """A coupled group's channels along one dim of a tensor: row ``c`` of ``index`` holds the
    positions of channel ``c``; positions outside the group are always kept."""

    def __init__(self, shape: torch.Size, dim: int, index: torch.Tensor):
        self.shape, self.dim, self.index = tuple(shape), dim, index.long()
        self.group_shape = (int(index.shape[0]),)
        self.per = int(index.shape[1])
        flat = self.index.flatten()
        self.flat = flat
        self.identity = len(flat) == self.shape[dim] and bool((flat == torch.arange(len(flat))).all())

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        picked = x.index_select(self.dim, self.flat.to(x.device)).movedim(self.dim, 0)
        picked = picked.reshape(self.group_shape[0], -1)
        return picked.sum(1) if op == "sum" else picked.amax(1)

    def expand(self, g: torch.Tensor) -> torch.Tensor:
        per_pos = g.repeat_interleave(self.per) if self.per > 1 else g
        if not self.identity:
            full = g.new_ones(self.shape[self.dim])
            per_pos = full.index_put((self.flat.to(g.device),), per_pos)
        view = [1] * len(self.shape)
        view[self.dim] = self.shape[self.dim]
        return per_pos.view(view)


@dataclass
class Member:
    """One tensor under a grid: a targeted weight (scored and counted) or a companion of its units."""

    target: Target
    tiling: _Entries | _Blocks | _Rows | _Slices
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
        if len(self.weights) == 1 and isinstance(self.weights[0].tiling, _Entries):
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

    def reduce(self, values: list[torch.Tensor], op: Literal["sum", "max"] = "sum") -> torch.Tensor:
        """Per-entry values of the weight members (in their order) -> one value per group."""
        out = None
        for m, v in zip(self.weights, values):
            r = m.tiling.reduce(v, op)
            out = r if out is None else (out + r if op == "sum" else torch.maximum(out, r))
        return out

    def score(self, values: list[torch.Tensor], how: Literal["l1", "mean", "l2", "max"]) -> torch.Tensor:
        """A group score from per-entry values (e.g. the weights): L1/L2 norm, mean or max of |v|."""
        if len(values) == 1 and isinstance(self.weights[0].tiling, _Entries):
            return values[0].abs()  # one weight per group: every score is |w|
        if how == "l2":
            return self.reduce([v.float().square() for v in values]).sqrt()
        if how == "max":
            return self.reduce([v.abs() for v in values], "max")
        total = self.reduce([v.abs().float() for v in values])
        return total / self.sizes if how == "mean" else total

    def select(self, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Boolean group mask keeping the best groups: ``density`` of the weights (N:M: per M)."""
        if self.granularity.kind == "n:m":
            return nm_mask(scores, self.granularity, density)
        if self.shard is not None:
            return sharding.select(self, scores, density)
        return _top_by_size(scores.flatten(), self.sizes.flatten(), density * self.numel).view(self.shape)

    def threshold(self, scores: torch.Tensor, density: float) -> float:
        """The score of the last group that :meth:`select` keeps (``inf`` when it keeps none)."""
        if self.shard is not None:
            return sharding.threshold(self, scores, density)
        return _threshold(scores.flatten(), self.sizes.flatten(), density * self.numel)


# -- building the grids ----------------------------------------------------------------------
def build_grids(targets: list[Target], granularity: Granularity, model: nn.Module | None = None,
                batchnorm: bool = True) -> list[GroupGrid]:
    """The group grids over ``targets`` (in target order).

    ``channel``: one grid per layer (per layer and direction for recurrent modules), with each
    unit's biases and - when ``model`` is given and ``batchnorm`` - the following BatchNorm's
    affine parameters as companions. Other granularities: one grid per target, no companions.
    """
    kind = granularity.kind
    if kind == "group":
        return _group_grids(targets, granularity, model)
    if kind != "channel":
        grids = []
        for t in targets:
            tiling = _Blocks(t.shape, granularity.block) if kind == "block" else _Entries(t.shape)
            grids.append(GroupGrid(t.name, granularity, [Member(t, tiling)]))
        return grids
    clusters: dict[tuple, list[Target]] = {}
    for t in targets:
        m = _RECURRENT.match(t.attr) if t.is_recurrent else None
        key = (id(t.module), m.group(1)) if m else (id(t), None)
        clusters.setdefault(key, []).append(t)
    modules = dict(model.named_modules()) if model is not None and batchnorm else {}
    grids = []
    for members in clusters.values():
        first = members[0]
        units = first.module.hidden_size if first.is_recurrent else first.shape[0]
        grid_members = [Member(t, _Rows(t.shape, units)) for t in members]
        for t in members:
            bias_attr = t.attr.replace("weight", "bias", 1)
            bias = getattr(t.module, bias_attr, None)
            if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == t.parameter.shape[0]:
                bias_target = Target(_sibling(t.name, bias_attr), t.module, bias_attr)  # .shape: this rank's rows
                grid_members.append(Member(bias_target, _Rows(bias_target.shape, units), "bias"))
        norm_name, norm = following_batchnorm(modules, first) if modules and not first.is_recurrent else (None, None)
        if norm is not None:
            norm_targets = [Target(f"{norm_name}.{a}", norm, a) for a in ("weight", "bias")]
            grid_members += [Member(nt, _Rows(nt.shape, units), "norm") for nt in norm_targets]
        grids.append(GroupGrid(first.name, granularity, grid_members))
    return grids


def _group_grids(targets: list[Target], granularity: Granularity, model: nn.Module | None) -> list[GroupGrid]:
    """One grid per coupled channel group that produces at least one target: the targets among its
    "out" slices are scored, its other producing parameters (biases, norms, layer scales) follow."""
    if model is None:
        raise ValueError("granularity 'group' needs the model, to find its coupled channel groups")
    from ..structure.groups import find_groups

    by_name = {t.name: t for t in targets}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    grids = []
    found = find_groups(model)
    for group in found:
        outs = [s for s in group.slices if s.role == "out" and s.tensor in params]
        weights = [Member(by_name[s.tensor], _Slices(params[s.tensor].shape, s.dim, s.index))
                   for s in outs if s.tensor in by_name]
        if not weights:
            continue
        companions = []
        for s in outs:
            if s.tensor in by_name:
                continue
            owner, _, attr = s.tensor.rpartition(".")
            companion = Target(s.tensor, modules[owner], attr)
            companions.append(Member(companion, _Slices(params[s.tensor].shape, s.dim, s.index),
                                     "bias" if attr == "bias" else "norm"))
        grids.append(GroupGrid(group.name, granularity, weights + companions, channel_group=group))
    if not grids:
        dropped = getattr(found, "dropped", None)
        raise ValueError("granularity 'group': no coupled channel group produces any targeted weight "
                         "(see hf-sparse inspect --groups)"
                         + (f"; left out as not removable exactly: {found.dropped_text()}" if dropped else ""))
    return grids


def target_problem(targets: list[Target], granularity: Granularity) -> str | None:
    """Why ``granularity`` cannot apply to these targets (a message naming the tensor), or None."""
    for t in targets:
        if granularity.kind == "n:m":
            width = t.shape[1] if t.param.dim() > 1 else 1
            if width % granularity.m:
                return f"N:M needs each target's input dimension divisible by M={granularity.m}; {t.name} has {width}"
        if granularity.kind == "factorized" and t.param.dim() != 2:
            return f"factorized gates need 2-D weights; {t.name} has shape {tuple(t.shape)}"
        if granularity.kind == "channel" and t.is_recurrent and t.shape[0] % t.module.hidden_size:
            return f"{t.name}: {t.shape[0]} rows do not split into units of {t.module.hidden_size}"
    return None


def following_batchnorm(modules: dict[str, nn.Module], target: Target) -> tuple[str | None, nn.Module | None]:
    """The affine BatchNorm registered after ``target``'s layer in the same parent (timm/torchvision
    convention), if nothing with weights (a Conv/Linear) comes between and its width matches."""
    path = target.name.rpartition(".")[0]
    parent_name, _, child = path.rpartition(".")
    parent = modules.get(parent_name)
    if not path or parent is None or child not in parent._modules:
        return None, None
    names = list(parent._modules)
    for name in names[names.index(child) + 1:]:
        sub = parent._modules[name]
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            ok = sub.affine and sub.num_features == target.parameter.shape[0]
            return (f"{parent_name}.{name}" if parent_name else name, sub) if ok else (None, None)
        if sub is not None and any(isinstance(x, (nn.Linear, nn.modules.conv._ConvNd)) for x in sub.modules()):
            return None, None
    return None, None


def _sibling(name: str, attr: str) -> str:
    prefix = name.rpartition(".")[0]
    return f"{prefix}.{attr}" if prefix else attr


# -- selection -----------------------------------------------------------------------------
def keep_top(grids: list[GroupGrid], scores: list[torch.Tensor], density: float,
             scope: Literal["layer", "global"] = "layer") -> list[torch.Tensor]:
    """Boolean group masks keeping the best-scoring groups: ``density`` of the weights per grid
    (``layer``) or of all grids together (``global``; N:M grids always select per M)."""
    if scope == "layer" or any(g.granularity.kind == "n:m" for g in grids):
        return [g.select(s, density) for g, s in zip(grids, scores)]
    if any(g.shard is not None for g in grids):
        return sharding.keep_top_global(grids, scores, density)
    flat, sizes, numel = _pooled(grids, scores)
    keep = _top_by_size(flat, sizes, density * numel)
    return [k.view(g.shape) for k, g in zip(keep.split([g.num for g in grids]), grids)]


def thresholds(grids: list[GroupGrid], scores: list[torch.Tensor], density: float,
               scope: Literal["layer", "global"] = "layer") -> list[float]:
    """Per grid, the score of the last group :func:`keep_top` keeps (``global``: one shared value)."""
    if scope == "layer":
        return [g.threshold(s, density) for g, s in zip(grids, scores)]
    if any(g.shard is not None for g in grids):
        return [sharding.threshold_global(grids, scores, density)] * len(grids)
    flat, sizes, numel = _pooled(grids, scores)
    return [_threshold(flat, sizes, density * numel)] * len(grids)


def _pooled(grids: list[GroupGrid], scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All grids' scores and group sizes as one flat ranking, and the weights behind them."""
    flat = torch.cat([s.flatten().float() for s in scores])
    sizes = torch.cat([g.sizes.flatten().to(flat.device) for g in grids])
    return flat, sizes, sum(g.numel for g in grids)


def _ranking(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> tuple[torch.Tensor, int]:
    """Flat groups ranked best first, and how many of them to keep for ``budget`` weights.

    Equal-sized groups: exactly ``round(budget / size)``. Otherwise the count whose sizes, taken
    in order, come closest to the budget. The ranking is a stable sort: ties go to the lower
    position, so every rank and every resumed run makes the same choice.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    if bool(sizes.min() == sizes.max()):
        return order, round(budget / float(sizes[0]))
    counts = torch.cat([sizes.new_zeros(1, dtype=torch.float64), torch.cumsum(sizes[order].double(), 0)])
    return order, int(torch.argmin((counts - budget).abs()))


def _threshold(flat: torch.Tensor, sizes: torch.Tensor, budget: float) -> float:
    """The score of the last group that keeping ``budget`` weights keeps (``inf`` when none)."""
    order, n = _ranking(flat, sizes, budget)
    return float(flat[order[n - 1]]) if n > 0 else float("inf")


def nm_mask(scores: torch.Tensor, granularity: Granularity, density: float | None = None) -> torch.Tensor:
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


def _top_by_size(scores: torch.Tensor, sizes: torch.Tensor, budget: float) -> torch.Tensor:
    """Boolean mask of the best flat groups for ``budget`` weights (see :func:`_ranking`)."""
    order, n = _ranking(scores, sizes, budget)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:n]] = True
    return keep


def density_of(grids: list[GroupGrid], masks: list[torch.Tensor]) -> float:
    """Kept fraction of the weights behind group masks (not counting companions); under FSDP2 of
    the whole grids (a collective)."""
    kept = [float((g.sizes * m).sum()) for g, m in zip(grids, masks)]
    if any(g.shard is not None for g in grids):
        kept = sharding.sum_floats(grids, kept)
    return sum(kept) / sum(g.total_numel for g in grids)


def check_mask_rule(weight: torch.Tensor, granularity: Granularity, units: int | None = None) -> str | None:
    """Check the granularity's shape rule on a weight's zeros; a message if it is broken.

    A kept trained weight is (almost surely) nonzero, so the zeros show the mask: every block or
    unit is all zero or all nonzero; at most N of every M along the input dimension are nonzero.
    """
    nonzero = weight != 0
    if granularity.kind == "n:m":
        kept = nm_count(nonzero, granularity.m)
        if bool((kept > granularity.n).any()):
            return f"more than {granularity.n} of {granularity.m} kept in some run"
        return None
    if granularity.kind == "block":
        tiling = _Blocks(weight.shape, granularity.block)
        any_kept = tiling.reduce(nonzero.float(), "max") > 0
        if bool((nonzero != tiling.expand(any_kept)).any()):
            return "a block mixes kept and pruned weights"
        return None
    if granularity.kind in ("channel", "group"):
        tiling = _Rows(weight.shape, units or weight.shape[0])
        any_kept = tiling.reduce(nonzero.float(), "max") > 0
        if bool((nonzero != tiling.expand(any_kept).expand(weight.shape)).any()):
            return "a unit mixes kept and pruned weights"
    return None


def nm_count(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept entries in every run of M along the input dimension."""
    moved = mask.movedim(1, -1) if mask.dim() > 2 else mask
    return moved.reshape(-1, m).sum(1)
