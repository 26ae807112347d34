"""Physically remove pruned channel groups from a model, and rebuild the smaller model for loading.

A structured run ends with whole channels at zero: every "out" slice of the channel (the weight
rows that produce it, their bias, the norm's affine entries) is exactly 0, so the channel is 0
wherever it is read. Removing it, together with the "in" slices that read it (the next layer's
input columns), cannot change the outputs beyond floating-point summation order.

:func:`purge_model` slices tensors generically, from the groups' slices (``index_select`` along each
slice's ``dim`` at the kept channels' positions), then fixes the modules' size attributes with a
small rule per module type (:func:`register_purge_rule`): ``out_channels``/``groups`` of a conv,
``in_features`` of a Linear, ``num_features`` of a BatchNorm, ``num_heads`` of an attention block...
The result is a plain model of the same classes with smaller tensors; no hf_sparse code runs in its
forward pass. The returned *plan* (new shapes + attributes, JSON) lets :func:`resize_to_plan` turn a
freshly built dense-shape model into the same small model, so a checkpoint needs only the original
config, the plan and the safetensors weights (never pickle).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..families import SPEECH_MODEL_TYPE, attention_classes, example_inputs, per_head_holders

if TYPE_CHECKING:
    from .groups import ChannelGroup, Slice


class PurgeError(ValueError):
    """A model cannot be purged as asked (an unsupported module, a removal that would change outputs)."""


# -- the per-module-type rules -------------------------------------------------------------------------


def _setattrs(module: nn.Module, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        setattr(module, key, tuple(value) if isinstance(value, list) else value)


@dataclass(frozen=True)
class PurgeRule:
    """How a module type's size attributes follow its (already sliced) tensors.

    ``read(module)`` returns the attributes to record, JSON-able; it may raise :class:`PurgeError`
    when the new shapes are not a valid module of that type. ``write(module, attrs)`` sets them on
    a module whose tensors already have the new shapes (default: ``setattr``, lists become tuples).
    ``owns_tensors``: False for container rules (an attention block whose projections hold the
    tensors); such rules run for every ancestor of a sliced module.
    """

    read: Callable[[nn.Module], dict[str, Any]]
    write: Callable[[nn.Module, Mapping[str, Any]], None] = _setattrs
    owns_tensors: bool = True


_RULES: dict[type, PurgeRule] = {}


def register_purge_rule(cls: type, read: Callable[[nn.Module], dict[str, Any]],
                        write: Callable[[nn.Module, Mapping[str, Any]], None] | None = None,
                        *, owns_tensors: bool = True) -> None:
    """Teach :func:`purge_model` / :func:`resize_to_plan` a module type (subclasses inherit it)."""
    _RULES[cls] = PurgeRule(read, write or _setattrs, owns_tensors)


def rule_for(module: nn.Module) -> PurgeRule | None:
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def _conv_read(m: nn.Module) -> dict[str, Any]:
    out, per_group = int(m.weight.shape[0]), int(m.weight.shape[1])
    groups = m.groups
    if groups > 1 and m.in_channels == m.groups:  # depthwise (channel multiplier out/in): groups follow the channels
        mult = m.out_channels // m.groups
        if out % mult:
            raise PurgeError(f"depthwise conv keeps {out} outputs, not a multiple of its channel multiplier {mult}")
        groups = out // mult
    elif groups > 1 and out % groups:
        raise PurgeError(f"grouped conv (groups={groups}) keeps {out} outputs, not a multiple of its groups")
    return {"out_channels": out, "in_channels": per_group * groups, "groups": groups}


def _conv_transpose_read(m: nn.Module) -> dict[str, Any]:
    if m.groups != 1:
        raise PurgeError("grouped transposed convolutions are not supported")
    return {"in_channels": int(m.weight.shape[0]), "out_channels": int(m.weight.shape[1])}


def _linear_read(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": int(m.weight.shape[1]), "out_features": int(m.weight.shape[0])}


def _norm_read(m: nn.Module) -> dict[str, Any]:
    t = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    return {"num_features": int(t.shape[0])}


def _layer_norm_read(m: nn.LayerNorm) -> dict[str, Any]:
    if m.weight is None:
        raise PurgeError("a LayerNorm without affine weights has no tensor that records its new width")
    return {"normalized_shape": list(m.weight.shape)}


def _group_norm_read(m: nn.GroupNorm) -> dict[str, Any]:
    channels = int(m.weight.shape[0])
    if channels % m.num_groups:
        raise PurgeError(f"GroupNorm keeps {channels} channels, not a multiple of its {m.num_groups} groups")
    return {"num_channels": channels}


def _embedding_read(m: nn.Embedding) -> dict[str, Any]:
    return {"embedding_dim": int(m.weight.shape[1])}


def _none(m: nn.Module) -> dict[str, Any]:
    return {}


def _heads(projected: int, head_dim: int, name: str) -> int:
    if projected % head_dim:
        raise PurgeError(f"{name}: {projected} projected features are not whole heads of {head_dim}; only whole "
                         "attention heads can be removed (the attention scale depends on the head size)")
    return projected // head_dim


def _timm_attention_read(m: nn.Module) -> dict[str, Any]:
    # timm's forward reshapes qkv to (3, num_heads, head_dim) and the output to attn_dim; its fused path
    # scales by 1/sqrt(q.size(-1)), so head_dim stays and whole heads go
    heads = _heads(int(m.qkv.weight.shape[0]) // 3, m.head_dim, "timm Attention")
    return {"num_heads": heads, "attn_dim": heads * m.head_dim}


def _hf_attention_read(m: nn.Module) -> dict[str, Any]:
    # transformers ViT/Swin attention views q/k/v as (..., -1, head_dim) and passes self.scaling, so
    # head_dim and the scale stay; only the head count changes
    heads = _heads(int(m.q_proj.weight.shape[0]), m.head_dim, type(m).__name__)
    return {"num_attention_heads": heads}


def _rnn_read(m: nn.Module) -> dict[str, Any]:
    from .recurrent import update_rnn

    return update_rnn(m)


def _rnn_write(m: nn.Module, attrs: Mapping[str, Any]) -> None:
    from .recurrent import set_rnn_sizes

    set_rnn_sizes(m, attrs)


def _register_builtin() -> None:
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_purge_rule(cls, _conv_read)
    for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_purge_rule(cls, _conv_transpose_read)
    register_purge_rule(nn.Linear, _linear_read)
    register_purge_rule(nn.modules.batchnorm._NormBase, _norm_read)  # BatchNorm*d, InstanceNorm*d (and timm's *Act)
    register_purge_rule(nn.LayerNorm, _layer_norm_read)
    register_purge_rule(nn.GroupNorm, _group_norm_read)
    register_purge_rule(nn.Embedding, _embedding_read)
    register_purge_rule(nn.GRU, _rnn_read, _rnn_write)
    register_purge_rule(nn.LSTM, _rnn_read, _rnn_write)
    try:  # timm: elementwise parameter holders (no attributes)
        from timm.layers import LayerScale

        register_purge_rule(LayerScale, _none)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    # attention blocks (container rules: the head count) and their per-head tables (sliced, no attributes)
    for cls, layout in attention_classes():
        register_purge_rule(cls, _timm_attention_read if layout == "fused" else _hf_attention_read, owns_tensors=False)
    for cls, _ in per_head_holders():
        register_purge_rule(cls, _none)
    try:
        from transformers.models.convnext.modeling_convnext import ConvNextLayer

        register_purge_rule(ConvNextLayer, _none)  # holds layer_scale_parameter, applied elementwise
    except ImportError:  # pragma: no cover
        pass


_register_builtin()


# -- finding and masking channels -------------------------------------------------------------------------


def _channel_view(t: torch.Tensor, s: Slice) -> torch.Tensor:
    """(channels, everything else) view of a slice's entries."""
    picked = t.detach().index_select(s.dim, s.index.flatten().to(t.device))
    return picked.movedim(s.dim, 0).reshape(s.index.shape[0], -1)


def zero_channels(model: nn.Module, groups: Iterable[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Group name -> indices of the channels to keep (sorted): a channel goes when every "out"
    parameter slice is exactly zero.

    Buffers (BatchNorm running statistics) do not count: with the weights and the affine terms of a
    channel at zero its output is zero whatever the statistics. A group with no live channel keeps
    channel 0 so every shape stays valid.
    """
    kept = {}
    for g in groups:
        idx = torch.nonzero(_alive(model, g)).flatten()
        kept[g.name] = idx if len(idx) else torch.zeros(1, dtype=torch.long)
    return kept


def _alive(model: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Bool per channel: some "out" parameter slice of it is nonzero."""
    params = dict(model.named_parameters())
    parts = [_channel_view(params[s.tensor], s).ne(0).any(1) for s in g.slices
             if s.role == "out" and s.tensor in params]
    return torch.stack(parts).any(0) if parts else torch.ones(g.channels, dtype=torch.bool)


@torch.no_grad()
def mask_channels(model: nn.Module, groups: Iterable[ChannelGroup], keep: Mapping[str, torch.Tensor]) -> None:
    """Zero every "out" parameter slice of the channels not in ``keep``, in place (what a structured
    run's final masks do); groups missing from ``keep`` are left alone."""
    params = dict(model.named_parameters())
    for g in groups:
        if g.name not in keep:
            continue
        drop = _dropped(g, keep[g.name])
        for s in g.slices:
            if s.role == "out" and s.tensor in params and len(drop):
                p = params[s.tensor]
                p.index_fill_(s.dim, s.index[drop].flatten().to(p.device), 0.0)


def keep_by_magnitude(model: nn.Module, groups: Iterable[ChannelGroup], density: float) -> dict[str, torch.Tensor]:
    """The ``round(density * channels)`` channels of each group with the largest L2 norm over its
    "out" weight slices (at least one): a uniform keep for benchmarks and tests."""
    params = dict(model.named_parameters())
    keep = {}
    for g in groups:
        score = torch.zeros(g.channels)
        for s in g.slices:
            if s.role == "out" and s.tensor in params:
                score += _channel_view(params[s.tensor], s).float().pow(2).sum(1).cpu()
        n = max(1, round(density * g.channels))
        keep[g.name] = torch.topk(score, n, sorted=False).indices.sort().values
    return keep


def _dropped(g: ChannelGroup, kept: torch.Tensor) -> torch.Tensor:
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= g.channels):
        raise PurgeError(f"group {g.name}: kept channels must lie in 0..{g.channels - 1}")
    drop = torch.ones(g.channels, dtype=torch.bool)
    drop[kept] = False
    return torch.nonzero(drop).flatten()


# -- purging ----------------------------------------------------------------------------------------------


def _is_recurrent(g: ChannelGroup, modules: Mapping[str, nn.Module]) -> bool:
    return any(s.role == "out" and isinstance(modules.get(s.module), (nn.GRU, nn.LSTM)) for s in g.slices)


def _replace_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise PurgeError(f"{name} is neither a parameter nor a buffer of {owner_name or 'the model'}")


def _owner(name: str) -> str:
    return name.rpartition(".")[0]


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


@torch.no_grad()
def purge_model(model: nn.Module, groups: Iterable[ChannelGroup], keep: Mapping[str, torch.Tensor], *,
                check: bool = True) -> dict[str, Any]:
    """Remove the channels not in ``keep`` (group name -> kept indices) from ``model``, in place.

    With ``check`` (the default) every removed channel must already be zero in all its "out"
    parameter slices (:func:`zero_channels`), so the outputs cannot change; ``check=False`` removes
    live channels too (benchmarks of widths). Groups missing from ``keep`` keep every channel.
    GRU/LSTM hidden units go through :func:`hf_sparse.structure.recurrent.purge_recurrent` (one hidden
    size per module). Returns the JSON-able plan for :func:`resize_to_plan`:
    ``{"shapes": {tensor: [dims]}, "attrs": {module: {attr: value}}}`` (only what changed).
    """
    groups = [g for g in groups if g.name in keep]
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    before = {k: tuple(v.shape) for k, v in state.items()}
    for g in groups:
        if not len(torch.as_tensor(keep[g.name]).flatten()):
            raise PurgeError(f"group {g.name}: keep at least one channel (a layer of width 0 is not a model)")
        if check:
            alive = _alive(model, g)
            live_dropped = [int(c) for c in _dropped(g, keep[g.name]) if alive[c]]
            if live_dropped:
                raise PurgeError(f"group {g.name}: channels {live_dropped[:8]} are not zero in their producing "
                                 f"tensors, so removing them would change the outputs")
    recurrent = [g for g in groups if _is_recurrent(g, modules)]
    plain = [g for g in groups if not _is_recurrent(g, modules)]
    touched: set[str] = set()
    for g in plain:
        for s in g.slices:
            if s.tensor not in state:
                raise PurgeError(f"group {g.name}: {s.tensor} is not in the model's state dict")
            touched.add(_owner(s.tensor))
    unsupported = sorted(name for name in touched if rule_for(modules[name]) is None
                         or not rule_for(modules[name]).owns_tensors)
    if unsupported:
        name = unsupported[0]
        raise PurgeError(f"cannot purge module {name!r} ({type(modules[name]).__name__}): no purge rule for its type, "
                         "so its size attributes cannot follow its tensors; register one with "
                         "hf_sparse.structure.purge.register_purge_rule")
    drops: dict[str, dict[int, list[torch.Tensor]]] = {}  # tensor -> dim -> positions to remove
    for g in plain:
        drop = _dropped(g, keep[g.name])
        if not len(drop):
            continue
        for s in g.slices:
            drops.setdefault(s.tensor, {}).setdefault(s.dim, []).append(s.index[drop].flatten())
    for tensor, dims in drops.items():
        value = state[tensor].detach()
        for dim, parts in dims.items():
            removed = torch.zeros(value.shape[dim], dtype=torch.bool)
            for p in parts:
                removed[p] = True
            value = value.index_select(dim, torch.nonzero(~removed).flatten().to(value.device))
        _replace_tensor(model, tensor, value.contiguous())
    attrs: dict[str, dict[str, Any]] = {}
    if recurrent:
        from .recurrent import purge_recurrent

        for name, changed in purge_recurrent(model, recurrent, {g.name: keep[g.name] for g in recurrent},
                                             check=check).items():
            attrs[name] = dict(changed)
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    changed_tensors = [k for k in after if after[k] != before.get(k)]
    owners = {_owner(k) for k in changed_tensors}
    for name in sorted(owners | {a for o in owners for a in _ancestors(o)}):
        module = modules[name]
        rule = rule_for(module)
        if rule is None:
            continue  # an ancestor without size attributes (a block, a Sequential)
        try:
            values = rule.read(module)
        except PurgeError as e:
            raise PurgeError(f"cannot purge module {name!r} ({type(module).__name__}): {e}") from None
        rule.write(module, values)
        if values:
            attrs[name] = {**attrs.get(name, {}), **values}
    return {"shapes": {k: list(after[k]) for k in changed_tensors}, "attrs": attrs}


@torch.no_grad()
def resize_to_plan(model: nn.Module, plan: Mapping[str, Any]) -> nn.Module:
    """Give a freshly built dense-shape model the plan's tensor shapes (uninitialised) and size
    attributes, in place, ready for ``load_state_dict(strict=True)`` of the purged weights.

    Tensors already of the planned shape are left alone, so a model built from a config that
    expresses the new widths passes through unchanged.
    """
    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())
    for name, shape in (plan.get("shapes") or {}).items():
        if name not in state:
            raise PurgeError(f"the purge plan names {name!r}, which {type(model).__name__} does not have")
        old = state[name]
        if list(old.shape) != list(shape):
            _replace_tensor(model, name, torch.empty(shape, dtype=old.dtype, device=old.device))
    for name, values in (plan.get("attrs") or {}).items():
        if name not in modules:
            raise PurgeError(f"the purge plan names module {name!r}, which {type(model).__name__} does not have")
        rule = rule_for(modules[name])
        (rule.write if rule else _setattrs)(modules[name], values)
    return model


def plan_params(plan: Mapping[str, Any], model: nn.Module) -> int:
    """Parameter count of ``model`` after ``plan`` (unique tensors), without building it."""
    shapes = plan.get("shapes") or {}
    total, seen = 0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape = shapes.get(name, list(p.shape))
        n = 1
        for d in shape:
            n *= int(d)
        total += n
    return total


# -- a purged copy for checkpoints ------------------------------------------------------------------------


def output_tensor(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's output tensor on ``inputs``: bare logits, ``ModelOutput.logits`` or its first field."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def uniform_config(model: nn.Module) -> dict[str, Any] | None:
    """The transformers config changes that build exactly the purged model's shapes, or None.

    Possible where every layer kept the same width and the architecture has one config field for
    it (ViT: heads and MLP size; hf_sparse speech models: the GRU/LSTM hidden size). The candidate is
    accepted only if a model built from it has the very same tensor shapes.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    changes: dict[str, Any] = {}
    mtype = getattr(config, "model_type", "")
    if mtype == "vit":
        from transformers.models.vit.modeling_vit import ViTAttention, ViTMLP

        heads = {m.num_attention_heads for m in model.modules() if isinstance(m, ViTAttention)}
        hidden = {m.fc1.out_features for m in model.modules() if isinstance(m, ViTMLP)}
        head_dims = {m.head_dim for m in model.modules() if isinstance(m, ViTAttention)}
        if len(heads) != 1 or len(hidden) != 1 or len(head_dims) != 1:
            return None
        changes = {"num_attention_heads": heads.pop(), "intermediate_size": hidden.pop(), "head_dim": head_dims.pop()}
    elif mtype == SPEECH_MODEL_TYPE:
        sizes = {m.hidden_size for m in model.modules() if isinstance(m, (nn.GRU, nn.LSTM))}
        if len(sizes) != 1:
            return None
        changes = {"hidden_size": sizes.pop()}
    else:
        return None
    candidate = type(config).from_dict({**config.to_dict(), **changes})
    with torch.device("meta"):
        built = type(model)(candidate)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    return changes if want == got else None


#: Largest max-abs output difference accepted between the gated model and its purged copy (fp32),
#: for outputs up to 1 in size; larger outputs scale it (see :func:`purge_tolerance`).
PURGE_TOLERANCE = 1e-5


def purge_tolerance(reference: torch.Tensor) -> float:
    """The accepted max-abs difference from ``reference`` outputs: ``PURGE_TOLERANCE`` times the largest
    output when that exceeds 1 (float32 sums in another order differ relative to their size)."""
    return PURGE_TOLERANCE * max(1.0, float(reference.abs().max()))

#: A purge that removes less than this fraction of the parameters leaves a file about as large as the
#: dense one: the zeros of unstructured (or block, N:M) sparsity sit inside channels that stay.
PURGE_HINT_FRACTION = 0.05


def purge_summary(params: Mapping[str, Any]) -> str:
    """One line on what a purge removed (``params``: ``dense`` and ``purged`` parameter counts), naming
    ``bitmask`` when it removed under :data:`PURGE_HINT_FRACTION`: a purge removes whole channels only,
    so on an unstructured run it writes a dense-size file while bitmask stores only the nonzeros."""
    dense, purged = int(params["dense"]), int(params["purged"])
    removed = dense - purged
    fraction = removed / max(dense, 1)
    line = f"purge removed {removed:,} of {dense:,} parameters ({fraction:.1%})"
    if fraction < PURGE_HINT_FRACTION:
        line += ("; a purge removes whole channels only, and this model's zeros are mostly inside channels "
                 "that stay: for unstructured sparsity use format bitmask (--format bitmask), which stores only the nonzeros")
    return line



def purge_for_export(model: nn.Module, structure: Mapping[str, Any] | None = None
                     ) -> tuple[nn.Module, dict[str, list[int]], dict[str, Any]]:
    """The one purge entry point: a smaller copy of ``model``, the kept units per weight, and what
    else the checkpoint records (the plan of a group purge). hf_sparse's LeNets and speech RNNs cut
    their own widths, which their configs hold (so the copy loads with ``from_pretrained``); any
    other model is purged by its channel groups (:func:`purge_copy`). ValueError when it cannot be.
    """
    from ..models.lenet import LeNetForImageClassification, purge_lenet
    from ..models.speech_rnn import SpeechRNNPreTrainedModel
    from .recurrent import purge_speech_rnn

    if isinstance(model, LeNetForImageClassification):
        return (*purge_lenet(model, structure), {})
    if isinstance(model, SpeechRNNPreTrainedModel):
        return (*purge_speech_rnn(model, structure), {})
    small, extra = purge_copy(model, structure)
    return small, extra.pop("kept"), extra


@torch.no_grad()
def purge_copy(model: nn.Module, structure: Mapping[str, Any] | None = None, *,
               inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
               groups: list[ChannelGroup] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A purged deep copy of ``model`` and the facts a checkpoint records about it.

    Groups come from :func:`hf_sparse.structure.groups.find_groups` on ``inputs`` (default
    :func:`example_inputs`). A group named in ``structure`` keeps those channels (each removed one
    must be zero); every other group loses every channel that is zero (:func:`zero_channels`).
    The copy's outputs are compared with the original's on ``inputs``: a difference above
    ``PURGE_TOLERANCE`` is a :class:`PurgeError`, never a wrong model. Returned facts:
    ``plan``, ``kept`` (group -> channel indices), ``channels`` (group -> dense width), ``params`` /
    ``macs`` (dense, purged, fraction), ``input_shape``, ``max_abs_diff`` and ``config`` (the
    transformers config fields that express the new widths, already set on the copy's config; None
    where the config cannot express them).
    """
    import copy

    from .budget import count_macs, count_params

    was_training = model.training
    model.eval()
    try:
        inputs = example_inputs(model) if inputs is None else inputs
        small = copy.deepcopy(model).eval()
        if groups is None:
            from .groups import find_groups

            with torch.enable_grad():  # a tracer may rely on autograd
                groups = find_groups(small, inputs)
            if not groups:
                raise PurgeError(f"{type(model).__name__} has no channel group that can be removed exactly "
                                 "(see hf-sparse inspect --groups); use format 'bitmask' or 'dense'")
        keep = zero_channels(small, groups)
        for name, wanted in (structure or {}).items():
            if name in keep:
                keep[name] = torch.as_tensor(sorted(int(i) for i in wanted), dtype=torch.long)
        reference = output_tensor(model, inputs)
        dense_params, dense_macs = count_params(model), count_macs(model, inputs).total
        plan = purge_model(small, groups, keep)
        diff = float((output_tensor(small, inputs) - reference).abs().max())
        if not diff <= (tolerance := purge_tolerance(reference)):
            raise PurgeError(f"the purged {type(model).__name__} differs from the gated one by {diff:.3g} (max abs) on "
                             f"an example input, above {tolerance:.3g}; refusing to save a wrong model")
        params, macs = count_params(small), count_macs(small, inputs).total
    finally:
        model.train(was_training)
    shape = {k: list(v.shape) for k, v in inputs.items()} if isinstance(inputs, Mapping) else list(inputs.shape)
    info = {
        "plan": plan,
        "kept": {g.name: keep[g.name].tolist() for g in groups},
        "channels": {g.name: g.channels for g in groups},
        "params": {"dense": dense_params, "purged": params, "fraction": params / max(dense_params, 1)},
        "macs": {"dense": dense_macs, "purged": macs, "fraction": macs / max(dense_macs, 1.0)},
        "input_shape": shape,
        "max_abs_diff": diff,
        "config": uniform_config(small),
    }
    for key, value in (info["config"] or {}).items():  # in place: the submodules share the config object
        setattr(small.config, key, value)
    return small, info


__all__ = ["PURGE_HINT_FRACTION", "PURGE_TOLERANCE", "PurgeError", "PurgeRule", "keep_by_magnitude", "mask_channels", "plan_params", "purge_model",
           "purge_copy", "purge_summary", "purge_tolerance", "register_purge_rule", "resize_to_plan", "rule_for", "uniform_config", "zero_channels"]
