"""``channel`` (aliases ``neuron``, ``unit``): output rows - a conv's output channel, a Linear's
output unit, a recurrent layer's hidden unit.

A hidden unit's group holds its rows in every gate block of both ``weight_ih_lK`` and
``weight_hh_lK`` (one grid per layer and direction). Its *companions* follow it: the unit's
biases and, where an affine BatchNorm normalises the layer's output, that BatchNorm's weight and
bias, so a removed channel emits exactly zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .granularity import Granularity, register_granularity
from .grid import GroupGrid, Member
from .targets import Target
from .tilings import Rows, mixes

#: Spellings of ``sparsity.granularity`` that mean ``channel``.
CHANNEL_ALIASES = ("channel", "neuron", "unit")
_RECURRENT = re.compile(r"^weight_(?:ih|hh)_(l\d+(?:_reverse)?)$")


@register_granularity
@dataclass(frozen=True)
class Channel(Granularity):
    name = "channel"
    aliases = CHANNEL_ALIASES[1:]
    help = "channel (neuron, unit)"
    structured = True
    gates_every_output = True

    def build(self, targets, model=None, batchnorm=True):
        """One grid per layer (per layer and direction for recurrent modules), with each unit's
        biases and - when ``model`` is given and ``batchnorm`` - the following BatchNorm's affine
        parameters as companions."""
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
            grid_members = [Member(t, Rows(t.shape, units)) for t in members]
            for t in members:
                bias_attr = t.attr.replace("weight", "bias", 1)
                bias = getattr(t.module, bias_attr, None)
                if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == t.parameter.shape[0]:
                    bias_target = Target(_sibling(t.name, bias_attr), t.module, bias_attr)  # .shape: this rank's rows
                    grid_members.append(Member(bias_target, Rows(bias_target.shape, units), "bias"))
            norm_name, norm = following_batchnorm(modules, first) if modules and not first.is_recurrent else (None, None)
            if norm is not None:
                norm_targets = [Target(f"{norm_name}.{a}", norm, a) for a in ("weight", "bias")]
                grid_members += [Member(nt, Rows(nt.shape, units), "norm") for nt in norm_targets]
            grids.append(GroupGrid(first.name, self, grid_members))
        return grids

    def target_problem(self, target):
        if target.is_recurrent and target.shape[0] % target.module.hidden_size:
            return f"{target.name}: {target.shape[0]} rows do not split into units of {target.module.hidden_size}"
        return None

    def mask_problem(self, weight, units=None):
        return unit_mask_problem(weight, units)

    def shard_rows(self, grid, chunks):
        if grid.members[0].tiling.blocks > 1:
            raise ValueError(f"{grid.name}: a recurrent unit's rows lie in several gate blocks, which FSDP2's dim-0 "
                             "shards split; channel granularity on recurrent layers is not supported under FSDP2")
        return chunks


def unit_mask_problem(weight, units: int | None = None) -> str | None:
    """Every output unit (``units`` per gate block; default every row) all zero or all nonzero."""
    return "a unit mixes kept and pruned weights" if mixes(weight, Rows(weight.shape, units or weight.shape[0])) else None


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
