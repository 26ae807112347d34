"""Which tensors a sparsity method acts on.

A *target* is one weight tensor of one module: the ``weight`` of a Linear/Conv, or one recurrent
matrix (``weight_ih_l0``, ``weight_hh_l1_reverse``, ...) of an ``nn.LSTM``/``nn.GRU``/``nn.RNN``.
Methods change targets in place (``param.data``), never by replacing the Parameter, so the
flat-weight buffers of recurrent modules, optimizers and DDP all keep seeing the same tensors.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

#: Layer types a recipe may name in ``sparsity.targets.layer_types``.
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "LSTM": nn.LSTM,
    "GRU": nn.GRU,
    "RNN": nn.RNN,
}
DEFAULT_LAYER_TYPES = tuple(LAYER_TYPES)

_RECURRENT_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")


@dataclass
class TargetSpec:
    """Selection rules; mirrors ``sparsity.targets`` in a recipe.

    Patterns match full parameter names (``features.0.weight``). A pattern that starts with
    ``re:`` is a regular expression (``re.search``); any other pattern is a glob (``fnmatch``).
    """

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=lambda: list(DEFAULT_LAYER_TYPES))


@dataclass
class Target:
    """One sparsified weight: ``getattr(module, attr)``, known in the model as ``name``."""

    name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)

    @property
    def layer_type(self) -> str:
        return type(self.module).__name__

    @property
    def is_recurrent(self) -> bool:
        return isinstance(self.module, nn.RNNBase)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    def numel(self) -> int:
        return self.param.numel()


def pattern_matches(pattern: str, name: str) -> bool:
    """Glob match, or regex search for patterns written ``re:<regex>``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def candidate_weights(model: nn.Module, layer_types: list[str]) -> list[Target]:
    """Every weight of the given layer types; biases and norm layers never qualify."""
    wanted = tuple(LAYER_TYPES[t] for t in layer_types)
    found = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, wanted):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, nn.RNNBase):
            attrs = [n for n, _ in module.named_parameters(recurse=False) if _RECURRENT_WEIGHT.match(n)]
        else:
            attrs = ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []
        found.extend(Target(prefix + a, module, a) for a in attrs)
    return found


def unmatched_patterns(model: nn.Module, spec: TargetSpec) -> list[tuple[str, str]]:
    """(``include``/``exclude``, pattern) for each pattern that matches no candidate weight."""
    names = [t.name for t in candidate_weights(model, spec.layer_types)]
    missing = []
    for kind, patterns in (("include", spec.include), ("exclude", spec.exclude)):
        missing += [(kind, p) for p in patterns if not any(pattern_matches(p, n) for n in names)]
    return missing


def resolve_targets(model: nn.Module, spec: TargetSpec | None = None) -> list[Target]:
    """The targets that ``spec`` selects, in module order (stable across processes)."""
    spec = spec or TargetSpec()
    return [
        t
        for t in candidate_weights(model, spec.layer_types)
        if any(pattern_matches(p, t.name) for p in spec.include)
        and not any(pattern_matches(p, t.name) for p in spec.exclude)
    ]
