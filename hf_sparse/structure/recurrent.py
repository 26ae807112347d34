"""Hidden units of ``nn.GRU``/``nn.LSTM`` as channel groups, and purging them.

A hidden unit ``u`` of layer ``k`` (one direction) is produced by its rows in every gate block of
``weight_ih_lk``/``weight_hh_lk`` and the matching bias entries (row ``g * hidden + u`` of gate
block ``g``: 3 blocks for a GRU, 4 for an LSTM). It is read by its column of ``weight_hh_lk``, by
column ``d * hidden + u`` of the next layer's ``weight_ih`` (both directions of it; ``d`` is 0
forward, 1 reverse) and, after the last layer, by the same column of the head reading the RNN's
output (the classifier or CTC head of hf_sparse's speech models).

Why masking a unit's "out" slices removes it exactly: with all its rows and biases zero and a zero
initial state, a GRU unit has ``r = z = sigmoid(0) = 1/2`` and ``n = tanh(0 + r * 0) = 0``, so
``h_t = (1 - z) n + z h_{t-1} = h_{t-1} / 2 = 0``; an LSTM unit has ``g = tanh(0) = 0``, so
``c_t = f c_{t-1} + i g = 0`` and ``h_t = o tanh(c_t) = 0``. The unit's state is 0 at every step,
its columns multiply zeros, and removing rows and columns together gives the same outputs.

One hidden size per module: ``nn.GRU``/``nn.LSTM`` have a single ``hidden_size`` for every layer and
direction, so a purge keeps, in every layer and direction of a module, the *largest* kept count
among them, padding the others with removed units (units that emit zero, as above, or that nothing
reads; their columns are zeroed, so nothing reads them after the purge). That is exact and keeps the parameter names and the speech config's single
``hidden_size``, so a purged checkpoint loads with plain ``from_pretrained``. The price is the
padding units' compute when the kept counts differ (in bidirectional models with gates per layer
they usually differ by a few units).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..families import join_name
from .groups import ChannelGroup, Slice

GATES = {nn.GRU: 3, nn.LSTM: 4}


def _gates(rnn: nn.Module) -> int:
    for cls, n in GATES.items():
        if isinstance(rnn, cls):
            return n
    raise TypeError(f"{type(rnn).__name__} is not an nn.GRU or nn.LSTM")


def _suffixes(rnn: nn.RNNBase) -> list[str]:
    return ["", "_reverse"] if rnn.bidirectional else [""]


def speech_heads(model: nn.Module) -> dict[str, str]:
    """RNN module name -> the Linear reading its output, for hf_sparse's speech models (else {})."""
    from ..models.speech_rnn import SpeechRNNForCTC, SpeechRNNForSequenceClassification

    if isinstance(model, SpeechRNNForSequenceClassification):
        return {"speech_rnn.rnn": "classifier"}
    if isinstance(model, SpeechRNNForCTC):
        return {"speech_rnn.rnn": "lm_head"}
    return {}


def recurrent_groups(model: nn.Module, *, exclude: Iterable[str] = (),
                     heads: Mapping[str, str] | None = None) -> list[ChannelGroup]:
    """One :class:`ChannelGroup` per layer and direction of every ``nn.GRU``/``nn.LSTM`` in ``model``.

    ``heads`` maps an RNN module's name to the ``nn.Linear`` that reads its output sequence
    (default: the classifier / CTC head of hf_sparse's speech models). Without a known reader, the
    last layer's units are the model's output and are left out, as is every layer of an RNN named in
    ``exclude``. Group names are ``{rnn}.l{k}`` and ``{rnn}.l{k}_reverse``.
    """
    excluded = set(exclude)
    heads = dict(speech_heads(model) if heads is None else heads)
    modules = dict(model.named_modules())
    groups = []
    for name, rnn in modules.items():
        if not isinstance(rnn, (nn.GRU, nn.LSTM)) or name in excluded:
            continue
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"{name}: LSTM with proj_size={rnn.proj_size} is not supported (its hidden state "
                             f"is projected, so units are not channels of the output)")
        head = heads.get(name)
        if head is not None and not isinstance(modules.get(head), nn.Linear):
            raise ValueError(f"{name}: the module reading its output, {head!r}, is not an nn.Linear of the model")
        if head is not None and modules[head].in_features != rnn.hidden_size * len(_suffixes(rnn)):
            raise ValueError(f"{name}: {head} has {modules[head].in_features} inputs, not the RNN's output width "
                             f"{rnn.hidden_size * len(_suffixes(rnn))}")
        groups += _module_groups(name, rnn, head)
    return groups


def _module_groups(name: str, rnn: nn.RNNBase, head: str | None) -> list[ChannelGroup]:
    hidden, gates, dirs = rnn.hidden_size, _gates(rnn), _suffixes(rnn)
    units = torch.arange(hidden)
    rows = units[:, None] + hidden * torch.arange(gates)[None, :]  # (units, gates): row of unit u in block g
    groups = []
    for k in range(rnn.num_layers):
        last = k == rnn.num_layers - 1
        if last and head is None:
            continue  # the last layer's output is the model's output: its width stays
        for d, sfx in enumerate(dirs):
            out = [Slice(join_name(name, f"{kind}_l{k}{sfx}"), name, 0, rows, "out")
                   for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                   if getattr(rnn, f"{kind}_l{k}{sfx}", None) is not None]
            reads = [Slice(join_name(name, f"weight_hh_l{k}{sfx}"), name, 1, units[:, None], "in")]
            columns = (d * hidden + units)[:, None]
            if last:
                reads.append(Slice(f"{head}.weight", head, 1, columns, "in"))
            else:
                reads += [Slice(join_name(name, f"weight_ih_l{k + 1}{s}"), name, 1, columns, "in") for s in dirs]
            groups.append(ChannelGroup(f"{join_name(name, f'l{k}')}{sfx}", hidden, out + reads))
    return groups


# -- purging ----------------------------------------------------------------------------------------


def removable_units(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Group name -> indices of the units to keep: a unit goes when all its "out" slices are exactly
    zero (it emits 0) or all its "in" slices are (nothing reads it)."""
    state = model.state_dict()
    kept = {}
    for g in groups:
        dead = {}
        for role in ("out", "in"):
            parts = [_channel_view(state[s.tensor], s).ne(0).any(1) for s in g.slices if s.role == role]
            dead[role] = ~torch.stack(parts).any(0) if parts else torch.zeros(g.channels, dtype=torch.bool)
        kept[g.name] = torch.nonzero(~(dead["out"] | dead["in"])).flatten()
    return kept


def _channel_view(t: torch.Tensor, s: Slice) -> torch.Tensor:
    """(channels, everything else) view of a slice's entries."""
    picked = t.detach().index_select(s.dim, s.index.flatten().to(t.device))
    picked = picked.movedim(s.dim, 0).reshape(*s.index.shape, -1)
    return picked.reshape(s.index.shape[0], -1)


def equal_counts(groups: list[ChannelGroup], keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``keep`` padded so every layer and direction of one RNN module keeps the same number of units.

    The count is the module's largest; a group keeping fewer gets its lowest-indexed removed units
    back (they emit exactly 0, see the module docstring). Groups of other modules pass unchanged.
    """
    keep = {k: torch.as_tensor(v, dtype=torch.long).flatten().sort().values for k, v in keep.items()}
    by_module: dict[str, list[ChannelGroup]] = {}
    for g in groups:
        if _is_recurrent_group(g):
            by_module.setdefault(g.slices[0].module, []).append(g)
    for members in by_module.values():
        if not any(g.name in keep for g in members):
            continue
        for g in members:  # a layer or direction the caller did not mention keeps every unit
            keep.setdefault(g.name, torch.arange(g.channels))
        count = max(1, max(len(keep[g.name]) for g in members))
        for g in members:
            have = keep[g.name]
            if len(have) < count:
                free = torch.ones(g.channels, dtype=torch.bool)
                free[have] = False
                extra = torch.nonzero(free).flatten()[: count - len(have)]
                keep[g.name] = torch.cat([have, extra]).sort().values
    return keep


def _is_recurrent_group(g: ChannelGroup) -> bool:
    first = g.slices[0]
    return first.role == "out" and ".weight_ih_l" in f".{first.tensor}" and first.index.dim() == 2


@torch.no_grad()
def purge_recurrent(model: nn.Module, groups: list[ChannelGroup], keep: Mapping[str, torch.Tensor],
                    *, check: bool = True) -> dict[str, dict[str, int]]:
    """Remove the units not in ``keep`` (group name -> kept indices) from ``model``, in place.

    Counts are first made equal per RNN module (:func:`equal_counts`); units kept only as padding
    must be removable (``check``: all "out" slices zero, or all "in" slices zero) and get their "in"
    columns zeroed, so nothing reads them. Every slice's tensor is cut along its ``dim`` to the kept positions, in
    their original order (gate blocks stay contiguous), then the modules' sizes are updated
    (:func:`update_rnn`, Linear ``in_features``). Returns module name -> updated attributes.
    """
    requested = {k: torch.as_tensor(v, dtype=torch.long).flatten() for k, v in keep.items()}
    keep = equal_counts(groups, requested)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    padding = {}
    for g in groups:  # check everything before changing anything
        if g.name not in keep:
            continue
        kept = keep[g.name]
        pad = torch.tensor(sorted(set(kept.tolist()) - set(requested.get(g.name, kept).tolist())), dtype=torch.long)
        if check and len(pad):
            live = sorted(set(pad.tolist()) & set(removable_units(model, [g])[g.name].tolist()))
            if live:
                raise ValueError(f"{g.name}: padding units {live[:5]} are neither zero in every 'out' tensor nor "
                                 f"unread, so they would change the outputs; remove only units that emit zero")
        padding[g.name] = pad
    plan: dict[str, dict[int, list[torch.Tensor]]] = {}  # tensor -> dim -> position lists to drop
    for g in groups:
        if g.name not in keep:
            continue
        drop = torch.ones(g.channels, dtype=torch.bool)
        drop[keep[g.name]] = False
        for s in g.slices:
            if len(padding[g.name]):
                params[s.tensor].index_fill_(s.dim, s.index[padding[g.name]].flatten(), 0.0)
            plan.setdefault(s.tensor, {}).setdefault(s.dim, []).append(s.index[drop].flatten())
    for tensor, dims in plan.items():
        p = params[tensor]
        owner_name, _, attr = tensor.rpartition(".")
        owner = modules[owner_name]
        value = p.detach()
        for dim, drops in dims.items():
            removed = torch.zeros(value.shape[dim], dtype=torch.bool)
            for d in drops:
                removed[d] = True
            value = value.index_select(dim, torch.nonzero(~removed).flatten().to(value.device))
        setattr(owner, attr, nn.Parameter(value.contiguous(), requires_grad=p.requires_grad))
    changed = {}
    for name in {s.module for g in groups if g.name in keep for s in g.slices}:
        module = modules[name]
        if isinstance(module, (nn.GRU, nn.LSTM)):
            changed[name] = update_rnn(module)
        elif isinstance(module, nn.Linear):
            module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
            changed[name] = {"in_features": module.in_features, "out_features": module.out_features}
    return changed


def update_rnn(rnn: nn.RNNBase) -> dict[str, int]:
    """Set ``hidden_size``/``input_size`` of a GRU/LSTM from its (sliced) weights; return them.

    Raises ``ValueError`` when the layers disagree (a purge must keep one size per module).
    """
    gates = _gates(rnn)
    sizes = {getattr(rnn, f"weight_hh_l{k}{s}").shape[1] for k in range(rnn.num_layers) for s in _suffixes(rnn)}
    if len(sizes) != 1:
        raise ValueError(f"{type(rnn).__name__} layers would get different hidden sizes {sorted(sizes)}; "
                         "nn.GRU/nn.LSTM have one hidden_size (pad the kept units to one count)")
    hidden = sizes.pop()
    for k in range(rnn.num_layers):
        for s in _suffixes(rnn):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                t = getattr(rnn, f"{kind}_l{k}{s}", None)
                if t is not None and t.shape[0] != gates * hidden:
                    raise ValueError(f"{kind}_l{k}{s} has {t.shape[0]} rows, not {gates} x {hidden}")
    return set_rnn_sizes(rnn, {"hidden_size": hidden, "input_size": rnn.weight_ih_l0.shape[1]})


def set_rnn_sizes(rnn: nn.RNNBase, attrs: Mapping[str, int]) -> dict[str, int]:
    """Write ``hidden_size``/``input_size`` and re-flatten the weights (cuDNN's single buffer); the
    loading side calls it on a freshly built module whose parameters were already resized."""
    for key in ("hidden_size", "input_size"):
        if key in attrs:
            setattr(rnn, key, int(attrs[key]))
    rnn._init_flat_weights()  # the flat weight list must point at the new parameters
    rnn.flatten_parameters()
    return {"hidden_size": rnn.hidden_size, "input_size": rnn.input_size}


# -- hf_sparse's speech models ----------------------------------------------------------------------


@torch.no_grad()
def purge_speech_rnn(model: nn.Module, structure: Mapping[str, list[int]] | None = None,
                     ) -> tuple[nn.Module, dict[str, list[int]]]:
    """A purged copy of a SpeechRNN classifier/CTC model and the kept units per recurrent weight.

    ``structure`` maps recurrent weight names (``speech_rnn.rnn.weight_ih_l0``...; what a
    channel/unit-granularity method reports) to the units to keep; without it every removable unit
    goes (:func:`removable_units`). The copy's config gets the new ``hidden_size``, so it saves and
    loads with plain ``from_pretrained``.
    """
    import copy

    small = copy.deepcopy(model)
    groups = recurrent_groups(small)
    if structure:
        keep = {}
        for g in groups:
            wanted = [structure[s.tensor] for s in g.slices if s.role == "out" and s.tensor in structure]
            if any(sorted(w) != sorted(wanted[0]) for w in wanted):
                raise ValueError(f"{g.name}: the structure keeps different units in its tensors")
            if wanted:
                keep[g.name] = torch.tensor(sorted(wanted[0]), dtype=torch.long)
        unknown = sorted(set(structure) - {s.tensor for g in groups for s in g.slices if s.role == "out"})
        unknown = [k for k in unknown if sorted(structure[k]) != list(range(_rows(small, k)))]
        if unknown:
            raise ValueError(f"cannot purge {', '.join(unknown[:5])}: not a hidden-unit weight of the recurrent "
                             f"layers (the last layer of a headless model, the front-end and the head keep their width)")
        zero = removable_units(small, [g for g in groups if g.name in keep])
        for name, kept in keep.items():  # a unit removed by the structure must emit zero already
            alive = set(zero[name].tolist()) - set(kept.tolist())
            if alive:
                raise ValueError(f"{name}: units {sorted(alive)[:5]} are removed by the structure but their "
                                 "weights are not zero, so removing them would change the outputs")
    else:
        keep = removable_units(small, groups)
    purge_recurrent(small, groups, keep)
    rnns = [m for m in small.modules() if isinstance(m, (nn.GRU, nn.LSTM))]
    if len(rnns) == 1 and hasattr(small, "config"):  # the speech config's one hidden_size
        small.config.hidden_size = rnns[0].hidden_size
    kept = {}
    final = equal_counts(groups, keep)
    for g in groups:
        for s in g.slices:
            if s.role == "out" and s.tensor.rpartition(".")[2].startswith("weight"):
                kept[s.tensor] = final[g.name].tolist()
    return small, kept


def _rows(model: nn.Module, name: str) -> int:
    p = dict(model.named_parameters()).get(name)
    return -1 if p is None else p.shape[0]


__all__ = ["equal_counts", "purge_recurrent", "purge_speech_rnn", "recurrent_groups", "removable_units",
           "set_rnn_sizes", "speech_heads", "update_rnn"]
