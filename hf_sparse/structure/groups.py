"""Coupled channel groups: which entries of which tensors must be removed together.

A *channel group* is a set of channels that only exist together: a conv's output channel, its
BatchNorm entries and the next conv's input slice; every tensor written into a residual stream
and every tensor reading it; one attention head's rows of q, k and v and its columns of the output
projection; a GRU/LSTM hidden unit's rows in every gate block and its columns wherever it is read.
Removing a channel means removing it from every slice of its group, or the model no longer exists.

Finding them: Torch-Pruning's dependency graph, not our own tracer
-------------------------------------------------------------------
``torch-pruning`` ("DepGraph", Fang et al. 2023) traces a model through autograd on one example
input and follows every coupling (residual adds, concatenations, depthwise convs, flattens into a
Linear, squeeze-excite gates) with index mappings. We checked it on the models we support (timm
resnet/convnext/mobilenetv3/vit, transformers ResNet/ConvNeXt/ViT): it finds the groups a reader
would draw by hand. Our own ``torch.fx`` tracer was the alternative; fx cannot trace most
transformers models (data-dependent control flow, ``ModelOutput``), timm needs leaf-module lists per
architecture, and both would re-implement DepGraph's index mappings. Autograd tracing sees what
actually ran, whatever Python did. What we add on top, because DepGraph's generic answer is not a
purge we can prove exact:

* attention heads are found from the attention module (timm ``Attention``, transformers
  ``ViTAttention``) instead: one group per head over q/k/v rows and the output projection's
  columns (DepGraph couples qkv features with the projection but not per head);
* a group is dropped when removing its channels would not be exact: a LayerNorm/GroupNorm whose
  statistics run over the channels, a grouped (not depthwise) conv, a module type we cannot slice,
  or channels whose index mapping is not one-to-one;
* layers that keep their width: the output head's outputs (the classes), the stem conv's outputs
  (the input stem of a CNN or ViT) unless ``keep_stem=False``, and every module matching an
  ``exclude`` pattern;
* GRU/LSTM hidden units come from :func:`hf_sparse.structure.recurrent.recurrent_groups` (DepGraph
  does not follow recurrent gate blocks).

A :class:`Slice` names a tensor (its state-dict name), the module owning it, the ``dim`` along
which the group's channels lie and ``index`` (channels x positions per channel): row ``c`` of
``index`` lists the positions of channel ``c`` along ``dim``. ``role`` is ``"out"`` for the tensors
that *produce* the channel (zeroing them zeroes the channel) and ``"in"`` for the ones reading it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = nn.modules.batchnorm._NormBase  # BatchNorm*d / InstanceNorm*d: per-channel, exact to slice
_MIXING_NORMS = (nn.LayerNorm, nn.GroupNorm)  # statistics over the channels: a removed zero still counts


@dataclass(frozen=True)
class Slice:
    """The entries of one tensor that belong to a group's channels (see the module docstring)."""

    tensor: str
    module: str
    dim: int
    index: torch.Tensor
    role: Literal["out", "in"]


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together, and every tensor slice they span."""

    name: str
    channels: int
    slices: list[Slice] = field(default_factory=list)

    def entries_per_channel(self, model: nn.Module) -> int:
        """Tensor entries one channel spans over all its slices (what keeping it costs)."""
        state = model.state_dict()
        return sum(int(s.index.shape[1]) * state[s.tensor].numel() // state[s.tensor].shape[s.dim]
                   for s in self.slices if s.tensor in state)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _wrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """hf_sparse's Trainer wrapper of a timm model -> (the timm model, its name prefix)."""
    inner = getattr(model, "model", None)
    return (inner, "model.") if hasattr(model, "timm_name") and isinstance(inner, nn.Module) else (model, "")


def head_module(model: nn.Module) -> str | None:
    """The name of the module producing the model's outputs (timm ``get_classifier()``, transformers
    ``classifier``/output embeddings, hf_sparse's speech heads), else the last Linear."""
    inner, prefix = _wrapped(model)
    if prefix:
        found = head_module(inner)
        return prefix + found if found is not None else None
    names = {m: n for n, m in model.named_modules()}
    candidates = []
    for getter in ("get_classifier", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                candidates.append(fn())
            except (NotImplementedError, AttributeError, TypeError):
                pass
    candidates += [getattr(model, a, None) for a in ("classifier", "lm_head", "head", "fc")]
    for c in candidates:
        if isinstance(c, nn.Sequential) and len(c):
            c = [m for m in c.modules() if isinstance(m, nn.Linear)][-1:] or [None]
            c = c[0]
        if isinstance(c, nn.Module) and c in names and list(c.parameters()):
            return names[c]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def stem_module(model: nn.Module) -> str | None:
    """The first convolution of a model that has one (a CNN's stem, a ViT's patch embedding)."""
    return next((n for n, m in model.named_modules() if isinstance(m, _CONV)), None)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") or name == p for p in patterns)


# -- attention heads ------------------------------------------------------------------------------------------


def _attention_blocks(model: nn.Module) -> dict[str, tuple[list[str], str, int, int]]:
    """Attention module name -> (q/k/v projection names, output projection name, heads, head_dim)."""
    found: dict[str, tuple[list[str], str, int, int]] = {}
    try:
        from timm.layers import Attention as TimmAttention
    except ImportError:  # pragma: no cover - timm is a dependency
        TimmAttention = ()
    for name, m in model.named_modules():
        if TimmAttention and isinstance(m, TimmAttention) and isinstance(getattr(m, "qkv", None), nn.Linear):
            found[name] = ([_join(name, "qkv")], _join(name, "proj"), int(m.num_heads), int(m.head_dim))
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(m, "head_dim") and type(m).__name__ == "ViTAttention":
            heads = m.q_proj.out_features // int(m.head_dim)
            found[name] = ([_join(name, a) for a in ("q_proj", "k_proj", "v_proj")], _join(name, "o_proj"),
                           heads, int(m.head_dim))
    return found


def _head_group(model: nn.Module, name: str, qkv: list[str], proj: str, heads: int, head_dim: int) -> ChannelGroup:
    """One channel per head: its q, k, v rows (weight and bias) and its output-projection columns.

    Exact: with a head's q, k and v rows and biases zero its scores are all 0, the softmax is
    uniform and the values are 0, so the head emits 0 and its projection columns read zeros."""
    modules = dict(model.named_modules())
    per_head = torch.arange(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]  # (heads, head_dim)
    if len(qkv) == 1:  # fused (3 * heads * head_dim) rows: q block, k block, v block
        width = heads * head_dim
        rows = torch.cat([per_head + k * width for k in range(3)], dim=1)
    else:
        rows = per_head
    slices = []
    for lin in qkv:
        slices.append(Slice(_join(lin, "weight"), lin, 0, rows, "out"))
        if modules[lin].bias is not None:
            slices.append(Slice(_join(lin, "bias"), lin, 0, rows, "out"))
    slices.append(Slice(_join(proj, "weight"), proj, 1, per_head, "in"))
    return ChannelGroup(f"{name}.heads", heads, slices)


# -- DepGraph groups -> our slices ----------------------------------------------------------------------------


class GroupError(ValueError):
    """A model whose channel groups cannot be found (its forward pass cannot be traced)."""


class _Skip(Exception):
    """This DepGraph group cannot be purged exactly (the reason is logged)."""


def _per_channel(idxs: list[int], roots: list[int] | None, channels: int) -> torch.Tensor:
    """(channels, positions) from DepGraph's parallel index / root-index lists."""
    if roots is None or any(r is None for r in roots):
        raise _Skip("an index mapping without root indices")
    by_root: dict[int, list[int]] = {}
    for i, r in zip(idxs, roots):
        by_root.setdefault(int(r), []).append(int(i))
    counts = {len(v) for v in by_root.values()}
    if sorted(by_root) != list(range(channels)) or len(counts) != 1:
        raise _Skip("channels that do not map one-to-one onto a tensor's positions")
    return torch.tensor([sorted(by_root[c]) for c in range(channels)], dtype=torch.long)


def _module_slices(name: str, m: nn.Module, is_out: bool, index: torch.Tensor) -> list[Slice]:
    def own(attr: str, dim: int, role: str) -> list[Slice]:
        t = getattr(m, attr, None)
        return [Slice(_join(name, attr), name, dim, index, role)] if isinstance(t, torch.Tensor) else []

    if isinstance(m, _CONV):
        if m.groups == 1:
            return own("weight", 0, "out") + own("bias", 0, "out") if is_out else own("weight", 1, "in")
        if m.groups == m.in_channels == m.out_channels:  # depthwise: input c -> output c, one weight row
            return own("weight", 0, "out") + own("bias", 0, "out")
        raise _Skip(f"{name} is a grouped convolution (groups={m.groups})")
    if isinstance(m, nn.Linear):
        return own("weight", 0, "out") + own("bias", 0, "out") if is_out else own("weight", 1, "in")
    if isinstance(m, _NORM):
        return [s for a in ("weight", "bias", "running_mean", "running_var") for s in own(a, 0, "out")]
    if isinstance(m, _MIXING_NORMS):
        raise _Skip(f"{name} ({type(m).__name__}) normalises over the channels, so removing one changes the rest")
    if not list(m.parameters(recurse=False)) and not list(m.buffers(recurse=False)):
        return []  # activations, pooling, identity: nothing to slice
    raise _Skip(f"{name} ({type(m).__name__}) holds tensors we do not know how to slice")


def _convert(dg, group, names: Mapping[nn.Module, str], param_names: Mapping[nn.Parameter, str],
             param_dims: Mapping[int, int]) -> ChannelGroup:
    root = group[0]
    channels = len(root.idxs)
    slices: dict[tuple[str, int], Slice] = {}
    for item in group.items:
        target = item.dep.target.module
        index = _per_channel(list(item.idxs), getattr(item, "root_idxs", None), channels)
        is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(target, nn.Parameter):
            pname = param_names.get(target)
            if pname is None:
                raise _Skip("an unnamed parameter")
            dim = param_dims.get(id(target), target.dim() - 1)
            found = [Slice(pname, pname.rpartition(".")[0], dim % target.dim(), index, "out")]
        elif isinstance(target, nn.Module) and target in names:
            if isinstance(target, (nn.RNNBase, nn.MultiheadAttention, nn.Embedding)):
                raise _Skip(f"{names.get(target)} ({type(target).__name__}) is not sliced here")
            found = _module_slices(names[target], target, is_out, index)
        else:
            continue  # a tensor operation DepGraph wraps (add, cat, reshape): its index mapping already ran
        for s in found:
            slices.setdefault((s.tensor, s.dim), s)
    root_name = names.get(root.dep.target.module) or param_names.get(root.dep.target.module, "group")
    return ChannelGroup(root_name, channels, list(slices.values()))


def _depgraph_groups(model: nn.Module, inputs, skip_out: set[str], attention: Mapping) -> list[ChannelGroup]:
    from .purge import output_tensor

    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError("finding channel groups needs the torch-pruning package (pip install torch-pruning)") from e
    names = {m: n for n, m in model.named_modules()}
    qkv = {q for qs, _, _, _ in attention.values() for q in qs}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, inputs, forward_fn=output_tensor, verbose=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure is one clear error, never a wrong model
        raise GroupError(f"cannot trace {type(model).__name__} to find its channel groups: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was_training)
    param_names = dict(dg._param_to_name)
    param_dims = {id(u.parameters): int(u.pruning_dim) for u in dg.unwrapped_parameters}
    groups = []
    for g in dg.get_all_groups():
        outs = {names.get(it.dep.target.module) for it in g.items if dg.is_out_channel_pruning_fn(it.dep.handler)}
        root = names.get(g[0].dep.target.module)
        if outs & qkv:
            continue  # attention projections: handled per head
        if outs & skip_out:
            logger.debug("channel group %s left out: it writes a layer that keeps its width", root)
            continue
        try:
            groups.append(_convert(dg, g, names, param_names, param_dims))
        except _Skip as why:
            logger.debug("channel group %s left out: %s", root, why)
    return groups


def find_groups(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None, *,
                exclude: Iterable[str] = (), keep_stem: bool = True) -> list[ChannelGroup]:
    """The channel groups of ``model`` that can be removed exactly, found on one example input.

    ``inputs`` defaults to :func:`hf_sparse.structure.purge.example_inputs`. Modules matching an
    ``exclude`` pattern (fnmatch, or a module name prefix) keep their width: no group writes them.
    The output head never loses outputs; with ``keep_stem`` the first convolution keeps its outputs
    too. Models with GRU/LSTM layers get their hidden units (recurrent groups) only.
    """
    exclude = list(exclude)
    if any(isinstance(m, (nn.GRU, nn.LSTM)) for m in model.modules()):
        from .recurrent import recurrent_groups

        return [g for g in recurrent_groups(model)
                if not any(s.role == "out" and _matches(s.module, exclude) for s in g.slices)]
    if inputs is None:
        from .purge import example_inputs

        inputs = example_inputs(model)
    modules = dict(model.named_modules())
    skip_out = {n for n in modules if n and _matches(n, exclude)}
    head = head_module(model)
    if head is not None:
        skip_out |= {n for n in modules if n == head or n.startswith(head + ".")}
    stem = stem_module(model) if keep_stem else None
    if stem is not None:
        skip_out.add(stem)
    attention = {n: a for n, a in _attention_blocks(model).items() if not _matches(n, exclude)}
    groups = _depgraph_groups(model, inputs, skip_out, attention)
    groups += [_head_group(model, n, *a) for n, a in attention.items()]
    seen: dict[str, int] = {}
    for g in groups:  # unique names (a module can root one group only, but be safe)
        seen[g.name] = seen.get(g.name, 0) + 1
        if seen[g.name] > 1:
            g.name = f"{g.name}#{seen[g.name]}"
    return groups


__all__ = ["ChannelGroup", "GroupError", "Slice", "find_groups", "head_module", "stem_module"]
