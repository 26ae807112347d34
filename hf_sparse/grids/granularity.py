"""The granularity protocol and its registry: what a ``sparsity.granularity`` kind owns.

Each kind is one class, registered under its name (``@register_granularity``), that parses its
recipe spelling, tiles targets into group grids, says why it cannot apply to a target, checks its
mask rule on trained weights, selects groups and tells how its group rows follow an FSDP2 shard.
Methods only ever call these through a :class:`~.grid.GroupGrid`, so a new kind is one new file.

``Granularity(kind, **params)`` makes the registered class of ``kind`` (``Granularity("block",
block=(4, 4))``); ``Granularity.parse(text, block_shape)`` reads a recipe's spelling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..registry import Registry
from .tilings import Entries, Tiling

if TYPE_CHECKING:
    from .grid import GroupGrid
    from .targets import Target

#: kind name -> Granularity subclass; the built-in kinds are imported on the first lookup.
GRANULARITIES: Registry = Registry("granularity", builtins=[
    f"hf_sparse.grids.{m}" for m in ("unstructured", "block", "nm", "channel", "group", "factorized")])


def register_granularity(cls: type[Granularity] | None = None, *, override: bool = False) -> Any:
    """Class decorator: make a granularity available under ``cls.name`` (a taken name is refused
    unless ``override=True``)."""
    def deco(kind: type[Granularity]) -> type[Granularity]:
        return GRANULARITIES.add(kind.name, kind, override=override)

    return deco(cls) if cls is not None else deco


class _ByKind(type):
    """``Granularity(kind, **params)`` builds the registered class of ``kind``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Granularity:
            kind = args[0] if args else kwargs.pop("kind", "unstructured")
            return GRANULARITIES[kind](*args[1:], **kwargs)
        return super().__call__(*args, **kwargs)


class Granularity(metaclass=_ByKind):
    """Base class of the granularity kinds (subclasses are frozen dataclasses: equal by value).

    The defaults describe single entries without a rule: one grid per target, entrywise tiling,
    selection by the grid's size-budgeted top-k.
    """

    #: the registry key and ``kind`` (the spelling in a recipe)
    name: ClassVar[str] = ""
    #: other spellings of the same kind
    aliases: ClassVar[tuple[str, ...]] = ()
    #: how the "unknown granularity" message lists it
    help: ClassVar[str] = ""
    #: whether groups are whole output units (the model can be purged to a smaller one)
    structured: ClassVar[bool] = False
    #: whether it gates the output units of every targeted layer, the head's too if targeted (its
    #: classes: a recipe must keep the head dense then)
    gates_every_output: ClassVar[bool] = False
    #: whether ``scope: global`` may rank its groups together with other grids' groups
    pooled: ClassVar[bool] = True
    #: every group is one entry and no group constrains another (fused per-entry kernels apply)
    independent: ClassVar[bool] = False
    #: gates on rank-1 components instead of groups of entries: only methods that list it take it
    low_rank: ClassVar[bool] = False
    #: whether it reads ``sparsity.block_shape``
    takes_block_shape: ClassVar[bool] = False

    # -- parsing --------------------------------------------------------------------------------
    @classmethod
    def claims(cls, text: str) -> bool:
        """Whether ``text`` (a recipe's ``sparsity.granularity``, stripped) names this kind."""
        return text == cls.name or text in cls.aliases

    @classmethod
    def from_text(cls, text: str, block_shape: list[int] | tuple[int, ...] | None) -> Granularity:
        """The instance ``text`` spells; ``ValueError`` with a user-facing message for bad values."""
        return cls()

    @staticmethod
    def parse(value: str, block_shape: list[int] | tuple[int, ...] | None = None) -> Granularity:
        """A recipe's ``sparsity.granularity`` (+ ``block_shape``); ``ValueError`` for a bad combination."""
        text = str(value).strip()
        kinds = list(GRANULARITIES.values())
        cls = next((k for k in kinds if k.claims(text)), None)
        if block_shape is not None and (cls is None or not cls.takes_block_shape):
            users = " or ".join(repr(k.name) for k in kinds if k.takes_block_shape)
            raise ValueError(f"block_shape is only used with granularity {users}, not {text!r}")
        if cls is None:
            raise ValueError(f"unknown granularity {text!r}; allowed: {', '.join(k.help or k.name for k in kinds)}")
        return cls.from_text(text, block_shape)

    @property
    def kind(self) -> str:
        return self.name

    @property
    def fixed_density(self) -> float | None:
        """The density the kind fixes (N:M: N/M); None: the recipe's target."""
        return None

    def __str__(self) -> str:
        return self.name

    # -- tiling ---------------------------------------------------------------------------------
    def tiling(self, shape: torch.Size) -> Tiling:
        """How one target of this shape maps onto its grid (used by the default :meth:`build`)."""
        return Entries(shape)

    def build(self, targets: list[Target], model: nn.Module | None = None, batchnorm: bool = True) -> list[GroupGrid]:
        """The group grids over ``targets`` (in target order): by default one per target."""
        from .grid import GroupGrid, Member

        return [GroupGrid(t.name, self, [Member(t, self.tiling(t.shape))]) for t in targets]

    def target_problem(self, target: Target) -> str | None:
        """Why this kind cannot apply to ``target`` (a message naming it), or None."""
        return None

    def density_problem(self, target: Target, density: float) -> tuple[str, str] | None:
        """``(recipe key, message)`` when ``density`` of this kind's groups cannot leave ``target`` any
        weight (its groups too coarse to keep a single one), else None."""
        return None

    def mask_problem(self, weight: torch.Tensor, units: int | None = None) -> str | None:
        """A message when the zeros of a trained ``weight`` break this kind's mask rule, else None."""
        return None

    # -- selection (``grid`` is one grid of this kind) --------------------------------------------
    def select(self, grid: GroupGrid, scores: torch.Tensor, density: float) -> torch.Tensor:
        """Boolean group mask keeping the best groups for ``density`` of the grid's weights."""
        return grid.top(scores, density)

    def keep_count(self, grid: GroupGrid, values: torch.Tensor, k: int) -> torch.Tensor:
        """Boolean group mask keeping the ``k`` largest ``values``."""
        return grid.top_k(values, k)

    def prune_below(self, grid: GroupGrid, kept: torch.Tensor, scores: torch.Tensor, eps: float,
                    density: float | None) -> torch.Tensor:
        """``kept`` less the groups scoring at most ``eps`` (a threshold pruning step)."""
        return kept & (scores > eps)

    def hysteresis(self, grid: GroupGrid, scores: torch.Tensor, kept: torch.Tensor, t: float,
                   band: tuple[float, float], density: float | None) -> torch.Tensor:
        """A kept group stays while its score exceeds ``band[0] * t``; a pruned one comes back above
        ``band[1] * t`` (one comparison against a per-group threshold does both)."""
        lo, hi = band
        return scores > kept.to(scores.dtype).mul_((lo - hi) * t).add_(hi * t)

    # -- FSDP2 --------------------------------------------------------------------------------------
    def shard_rows(self, grid: GroupGrid, chunks: list[int]) -> list[int]:
        """Group rows on each rank, given each rank's rows of the tensors (dim-0 FSDP2 shards);
        ``ValueError`` when the shards would split a group."""
        return chunks


class GranularityKinds:
    """The kinds a method takes, as a container of names: every registered kind except the
    ``low_rank`` ones, which only the method that lists them in ``extra`` takes."""

    def __init__(self, *extra: str):
        self.extra = extra

    def __contains__(self, kind: object) -> bool:
        cls = GRANULARITIES.get(kind) if isinstance(kind, str) else None
        return cls is not None and (not cls.low_rank or kind in self.extra)

    def __iter__(self):
        return iter([name for name in GRANULARITIES if name in self])

    def __repr__(self) -> str:
        return f"GranularityKinds({', '.join(self)})"
