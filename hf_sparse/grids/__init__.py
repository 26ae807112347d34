"""The grids layer: the sole owner of granularity and FSDP2 sharding.

Every method scores, masks or gates *groups* of the targeted tensors' entries; this layer owns what
a group is (each ``sparsity.granularity`` kind is one registered :class:`Granularity` class, one
module each: ``unstructured``, ``block``, ``nm``, ``channel``, ``group``, ``factorized``), which
tensors a method targets (:mod:`.targets`), and how a grid of groups follows FSDP2 shards
(:mod:`.shards`), so method code has one path for every granularity and for sharded and unsharded
parameters alike. It sits between ``structure`` (coupled channel groups) and ``methods``.
"""

from __future__ import annotations

from .granularity import GRANULARITIES, Granularity, GranularityKinds, register_granularity
from .grid import (
    GroupGrid,
    Member,
    build_grids,
    check_mask_rule,
    density_of,
    keep_top,
    kept_weights,
    refuse_split,
    sum_over_ranks,
    sum_over_ranks_differentiable,
    target_problem,
    thresholds,
    top_k_mask,
)
from .shards import local
from .targets import LAYER_TYPES, Target, TargetSpec, pattern_matches, resolve_targets

#: The default granularity (loads the built-in kinds, in the registry's order).
UNSTRUCTURED = Granularity()

__all__ = [
    "GRANULARITIES", "LAYER_TYPES", "UNSTRUCTURED", "Granularity", "GranularityKinds", "GroupGrid", "Member",
    "Target", "TargetSpec", "build_grids", "check_mask_rule", "density_of", "keep_top", "kept_weights", "local",
    "pattern_matches", "refuse_split", "register_granularity", "resolve_targets", "sum_over_ranks",
    "sum_over_ranks_differentiable", "target_problem", "thresholds", "top_k_mask",
]
