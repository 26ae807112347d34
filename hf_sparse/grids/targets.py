"""Which tensors a sparsity method acts on.

A *target* is one weight tensor of one module: the ``weight`` of a Linear/Conv, or one recurrent
matrix (``weight_ih_l0``, ``weight_hh_l1_reverse``, ...) of an ``nn.LSTM``/``nn.GRU``/``nn.RNN``.
Methods change targets in place (``param.data``), never by replacing the Parameter, so the
flat-weight buffers of recurrent modules, optimizers and DDP all keep seeing the same tensors.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .shards import local

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
    The output head (see :func:`head_weight_names`) stays dense unless ``include_head`` is true.
    """

    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=lambda: list(DEFAULT_LAYER_TYPES))
    include_head: bool = False


@dataclass
class Target:
    """One sparsified weight: ``getattr(module, attr)``, known in the model as ``name``."""

    name: str
    module: nn.Module
    attr: str

    @property
    def parameter(self) -> nn.Parameter:
        """The registered parameter (under FSDP2 a DTensor sharded over the ranks)."""
        return getattr(self.module, self.attr)

    @property
    def param(self) -> nn.Parameter:
        """The values this process holds and writes: the parameter, or under FSDP2 this rank's shard."""
        return local(getattr(self.module, self.attr))

    @property
    def grad(self) -> torch.Tensor | None:
        """The gradient of :attr:`param` (under FSDP2 this rank's shard of the reduce-scattered one)."""
        g = getattr(self.module, self.attr).grad
        return None if g is None else local(g)

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


#: Attributes that hold the output head of a transformers/hf_sparse/plain model (CTC: ``lm_head``).
_HEAD_ATTRS = ("classifier", "lm_head", "head", "fc")


def head_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the model's output head, or None when it has no recognisable one.

    timm models name theirs with ``get_classifier()``; transformers models with
    ``get_output_embeddings()`` or a ``classifier``/``lm_head`` module; hf_sparse's timm wrapper
    holds the timm model as ``.model``. A pruned head row silences a class outright, so heads stay dense
    by default.
    """
    for prefix, m in (("", model), ("model.", getattr(model, "model", None))):
        if not isinstance(m, nn.Module):
            continue
        found = None
        if callable(getattr(m, "get_classifier", None)):
            found = m.get_classifier()
        if not isinstance(found, nn.Module) and callable(getattr(m, "get_output_embeddings", None)):
            try:
                found = m.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                found = None
        if not isinstance(found, nn.Module):
            found = next((h for h in (getattr(m, a, None) for a in _HEAD_ATTRS) if isinstance(h, nn.Module)), None)
        if isinstance(found, nn.Module) and found is not model:
            name = next((n for n, sub in m.named_modules() if sub is found), None)
            if name:
                return prefix + name, found
    return None


def head_weight_names(model: nn.Module, layer_types: list[str] | None = None) -> set[str]:
    """Names of the candidate weights that belong to the output head (empty when there is none)."""
    head = head_module(model)
    if head is None:
        return set()
    prefix = head[0] + "."
    return {t.name for t in candidate_weights(model, layer_types or list(DEFAULT_LAYER_TYPES))
            if t.name.startswith(prefix)}


def unmatched_patterns(model: nn.Module, spec: TargetSpec) -> list[tuple[str, str]]:
    """(``include``, pattern) for each include pattern that matches no candidate weight.

    An ``exclude`` that matches nothing is not an error (one recipe may serve several model
    families); :func:`resolve_targets` warns about it.
    """
    names = [t.name for t in candidate_weights(model, spec.layer_types)]
    return [("include", p) for p in spec.include if not any(pattern_matches(p, n) for n in names)]


def resolve_targets(model: nn.Module, spec: TargetSpec | None = None) -> list[Target]:
    """The targets that ``spec`` selects, in module order (stable across processes)."""
    spec = spec or TargetSpec()
    candidates = candidate_weights(model, spec.layer_types)
    idle = [p for p in spec.exclude if not any(pattern_matches(p, t.name) for t in candidates)]
    if idle:
        warnings.warn(f"sparsity.targets.exclude: {', '.join(map(repr, idle))} matches no weight of "
                      f"{type(model).__name__}", stacklevel=2)
    head = set() if spec.include_head else head_weight_names(model, spec.layer_types)
    return [
        t
        for t in candidates
        if t.name not in head
        and any(pattern_matches(p, t.name) for p in spec.include)
        and not any(pattern_matches(p, t.name) for p in spec.exclude)
    ]
