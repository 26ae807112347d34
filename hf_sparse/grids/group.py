"""``group``: coupled channel groups (:func:`hf_sparse.structure.groups.find_groups`).

The channels that a residual add, a depthwise conv, an attention head or a recurrent unit ties
together, one group per channel over every tensor that produces it (weights, biases, norms, layer
scales). A targeted weight that no group produces (a layer that keeps its width: the stem, the
head, anything tied to them) stays dense; densities count the grouped weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .channel import unit_mask_problem
from .granularity import Granularity, register_granularity
from .grid import GroupGrid, Member
from .shards import is_sharded
from .targets import Target
from .tilings import Slices


@register_granularity
@dataclass(frozen=True)
class Group(Granularity):
    name = "group"
    help = "group (coupled channel groups)"
    structured = True

    def build(self, targets, model=None, batchnorm=True):
        """One grid per coupled channel group that produces at least one target: the targets among
        its "out" slices are scored, its other producing parameters (biases, norms, layer scales) follow."""
        if any(is_sharded(t.parameter) for t in targets):
            raise ValueError("granularity group is not supported with FSDP2-sharded parameters yet: a group couples "
                             "the output rows of one weight with the input columns of the next, which FSDP2's dim-0 "
                             "shards put on different ranks; use DDP or granularity channel")
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
            weights = [Member(by_name[s.tensor], Slices(params[s.tensor].shape, s.dim, s.index))
                       for s in outs if s.tensor in by_name]
            if not weights:
                continue
            companions = []
            for s in outs:
                if s.tensor in by_name:
                    continue
                owner, _, attr = s.tensor.rpartition(".")
                companion = Target(s.tensor, modules[owner], attr)
                companions.append(Member(companion, Slices(params[s.tensor].shape, s.dim, s.index),
                                         "bias" if attr == "bias" else "norm"))
            grids.append(GroupGrid(group.name, self, weights + companions, channel_group=group))
        if not grids:
            dropped = getattr(found, "dropped", None)
            raise ValueError("granularity 'group': no coupled channel group produces any targeted weight "
                             "(see hf-sparse inspect --groups)"
                             + (f"; left out as not removable exactly: {found.dropped_text()}" if dropped else ""))
        return grids

    def mask_problem(self, weight, units=None):
        return unit_mask_problem(weight, units)
