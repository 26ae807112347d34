"""What a model costs to store and to run: parameters and MACs, measured and expected.

What counts as a MAC
--------------------
One multiply-accumulate of a *weight* with an input value, per sample: a convolution costs
``output positions x weight entries`` (``H_out * W_out * out * in/groups * kh * kw``), a Linear
``rows x weight entries`` (rows = tokens, 1 for a pooled feature vector), a GRU/LSTM layer
``time steps x (weight_ih + weight_hh entries)`` per direction. Biases, normalisation,
activations, pooling, residual adds and weight-free matmuls (attention's ``q k^T`` and ``a v``)
are not counted. This is the convention behind the usual figures (torchvision/timm resnet18 at
224x224: 1.82 GMACs, 11.69M parameters). Parameters are the model's distinct ``nn.Parameter``
entries (buffers such as BatchNorm statistics are not parameters).

Counting uses forward hooks on one pass at the training resolution: the output positions of each
weight are what the pass saw, and removing channels never changes them.

Expected cost of the purged model
---------------------------------
Channel groups (:class:`~hf_sparse.structure.groups.ChannelGroup`) say which entries of which
tensors belong to which channel: a slice with ``dim`` and ``index`` (channels x per_channel
positions along ``dim``). A tensor entry survives the purge when the channel of every one of its
indexed dims is kept, so with independent gates of keep probabilities ``p``:

* a tensor indexed along one dim (a bias, a BatchNorm vector, a conv whose inputs are fixed)
  keeps ``numel / n * sum(p)`` entries in expectation;
* a tensor indexed along two dims (a conv's output dim by one group and its input dim by another)
  keeps ``numel / (n0 n1) * (sum p_out * sum p_in)`` - the product of the expected kept widths;
  where both dims index the *same* gate (a recurrent ``weight_hh`` reads the units it produces)
  the pair costs ``p``, not ``p^2``, which a correction term adds exactly. A depthwise conv's
  weight is ``(C, 1, kh, kw)``: its channels appear on dim 0 only, so it costs ``p`` per channel.

MACs are the same expectations weighted by each weight's output positions. Everything is a
differentiable function of the probabilities (for L0's budget constraint); with 0/1
probabilities it is the exact cost of the purged model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .groups import ChannelGroup, Slice

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RNN = (nn.GRU, nn.LSTM, nn.RNN)

Inputs = torch.Tensor | Mapping[str, torch.Tensor] | tuple


def count_params(model: nn.Module) -> int:
    """Distinct parameter entries of ``model`` (shared/tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _batch_size(inputs: Inputs) -> int:
    if torch.is_tensor(inputs):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("cannot tell the batch size of the example inputs (no tensor in them)")


def _call(model: nn.Module, inputs: Inputs):
    if torch.is_tensor(inputs):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


@torch.no_grad()
def weight_positions(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """Per weight tensor (state_dict name), how many positions per sample it is applied at.

    One forward pass with hooks on every Conv/ConvTranspose/Linear/GRU/LSTM/RNN module; a
    module called several times adds up its calls. ``MACs = positions x weight entries``.
    """
    batch = _batch_size(inputs)
    names = {m: n for n, m in model.named_modules()}
    found: dict[str, float] = {}

    def hook(module: nn.Module, args, output) -> None:
        name = names[module]
        prefix = f"{name}." if name else ""
        if isinstance(module, _RNN):
            x = args[0]
            if isinstance(x, nn.utils.rnn.PackedSequence):
                steps = float(x.data.shape[0]) / batch  # total valid steps over the batch, per sample
            else:
                steps = float(x.shape[1] if module.batch_first and x.dim() == 3 else x.shape[0])
            for attr, _ in module.named_parameters(recurse=False):
                if attr.startswith("weight_"):
                    found[prefix + attr] = found.get(prefix + attr, 0.0) + steps
            return
        y = output[0] if isinstance(output, tuple) else output
        if isinstance(module, _CONV_T):
            x = args[0]
            spatial = x.shape[-(x.dim() - 2):] if x.dim() > 2 else ()
            pos = float(math.prod(spatial)) * x.shape[0] / batch
        elif isinstance(module, _CONV):
            pos = float(math.prod(y.shape[2:])) * y.shape[0] / batch
        else:  # Linear: every row of the output is one application
            pos = y.numel() / y.shape[-1] / batch
        found[prefix + "weight"] = found.get(prefix + "weight", 0.0) + pos

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*_CONV, *_CONV_T, nn.Linear, *_RNN))]
    was_training = model.training
    try:
        model.eval()  # no BatchNorm statistics update from the counting pass
        _call(model, inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


@dataclass
class MacCount:
    """Measured MACs per sample: the total and per weight tensor."""

    total: float
    per_tensor: dict[str, float]


def count_macs(model: nn.Module, inputs: Inputs) -> MacCount:
    """MACs per sample of one forward pass on ``inputs`` (see the module docstring for what counts)."""
    params = dict(model.named_parameters())
    per = {n: pos * params[n].numel() for n, pos in weight_positions(model, inputs).items() if n in params}
    return MacCount(float(sum(per.values())), per)


# -- expected cost from keep probabilities ---------------------------------------------------
@dataclass
class _TensorCost:
    name: str
    numel: int
    positions: float  # MAC positions per sample (0: no MACs)
    dims: list[tuple[int, int, list[torch.Tensor]]] = field(default_factory=list)  # (dim, size, maps)


@dataclass
class Cost:
    """Parameters and MACs per sample (tensors: differentiable when computed from probabilities)."""

    params: torch.Tensor
    macs: torch.Tensor

    def __getitem__(self, kind: str) -> torch.Tensor:
        return getattr(self, kind)


class CostModel:
    """Parameters and MACs of a model as functions of per-group keep probabilities.

    Built once from the groups and one hook pass; :meth:`expected` evaluates the expectation for
    any probabilities (one tensor of ``channels`` values per group, missing groups = kept).
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup], inputs: Inputs):
        groups = list(groups)
        self.group_names = [g.name for g in groups]
        self.channels = [int(g.channels) for g in groups]
        self.offsets, total = [], 0
        for c in self.channels:
            self.offsets.append(total)
            total += c
        self.const = total  # index of the always-kept slot
        params = dict(model.named_parameters())
        positions = weight_positions(model, inputs)
        self.tensors: dict[str, _TensorCost] = {
            n: _TensorCost(n, p.numel(), positions.get(n, 0.0)) for n, p in params.items()}
        shapes = {n: p.shape for n, p in params.items()}
        for gi, g in enumerate(groups):
            for s in g.slices:
                if s.tensor not in self.tensors:
                    continue  # a buffer (BatchNorm statistics): no parameters, no MACs
                size = shapes[s.tensor][s.dim]
                index = torch.as_tensor(s.index, dtype=torch.long).reshape(g.channels, -1)
                if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
                    raise ValueError(f"group {g.name!r}: slice of {s.tensor} dim {s.dim} indexes beyond its size {size}")
                gate = (self.offsets[gi] + torch.arange(g.channels))[:, None].expand_as(index).reshape(-1)
                self._place(self.tensors[s.tensor], s.dim, size, index.reshape(-1), gate)
        for t in self.tensors.values():
            if len(t.dims) > 2:
                raise ValueError(f"{t.name}: channels indexed along {len(t.dims)} dims; at most 2 are supported")
        dense = self.expected({})
        self.dense_params, self.dense_macs = float(dense.params), float(dense.macs)

    def _place(self, t: _TensorCost, dim: int, size: int, positions: torch.Tensor, gate: torch.Tensor) -> None:
        entry = next((d for d in t.dims if d[0] == dim), None)
        if entry is None:
            entry = (dim, size, [])
            t.dims.append(entry)
        maps = entry[2]
        for m in maps:  # first map where these positions are still free (a concat splits a dim)
            if bool((m[positions] == self.const).all()):
                m[positions] = gate
                return
        m = torch.full((size,), self.const, dtype=torch.long)
        m[positions] = gate
        maps.append(m)

    def probabilities(self, probs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One flat vector: every group's probabilities in order, then the always-kept 1."""
        parts, ref = [], next((v for v in probs.values()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        for name, c in zip(self.group_names, self.channels):
            p = probs.get(name)
            if p is None:
                parts.append(torch.ones(c, dtype=torch.float64, device=device))
            else:
                if p.numel() != c:
                    raise ValueError(f"group {name!r} has {c} channels, got {p.numel()} probabilities")
                parts.append(p.reshape(-1).to(torch.float64))
        parts.append(torch.ones(1, dtype=torch.float64, device=device))
        return torch.cat(parts)

    def _kept(self, t: _TensorCost, allp: torch.Tensor) -> torch.Tensor:
        if not t.dims:
            return allp.new_tensor(float(t.numel))
        sums, firsts = [], []
        for _, size, maps in t.dims:
            p = allp[maps[0].to(allp.device)]
            for m in maps[1:]:
                p = p * allp[m.to(allp.device)]
            sums.append(p.sum())
            firsts.append((size, maps))
        per_pos = t.numel / math.prod(size for size, _ in firsts)
        kept = sums[0] if len(sums) == 1 else sums[0] * sums[1]
        if len(sums) == 2 and len(firsts[0][1]) == 1 and len(firsts[1][1]) == 1:
            # pairs whose both dims index one gate: E[z z] = p, not p^2
            n = allp.numel()
            c0 = torch.bincount(firsts[0][1][0], minlength=n).to(allp)
            c1 = torch.bincount(firsts[1][1][0], minlength=n).to(allp)
            kept = kept + (c0 * c1 * (allp - allp * allp)).sum()
        return per_pos * kept

    def expected(self, probs: Mapping[str, torch.Tensor]) -> Cost:
        """Expected parameters and MACs per sample of the purged model (differentiable in ``probs``)."""
        allp = self.probabilities(probs)
        params = allp.new_zeros(())
        macs = allp.new_zeros(())
        for t in self.tensors.values():
            kept = self._kept(t, allp)
            params = params + kept
            if t.positions:
                macs = macs + t.positions * kept
        return Cost(params, macs)

    def fraction(self, probs: Mapping[str, torch.Tensor], kind: str) -> torch.Tensor:
        """Expected ``params`` or ``macs`` of the purged model as a fraction of dense."""
        dense = self.dense_params if kind == "params" else self.dense_macs
        return self.expected(probs)[kind] / dense

    def minimum(self, kind: str) -> float:
        """The cost fraction with every group closed: what the ungrouped layers cost alone."""
        probs = {n: torch.zeros(c, dtype=torch.float64) for n, c in zip(self.group_names, self.channels)}
        return float(self.fraction(probs, kind))

    def kept(self, keep: Mapping[str, torch.Tensor]) -> Cost:
        """Exact cost when group ``name`` keeps the channels ``keep[name]`` (indices, a bool or 0/1 mask)."""
        probs = {}
        for name, c in zip(self.group_names, self.channels):
            k = keep.get(name)
            if k is None:
                continue
            k = torch.as_tensor(k)
            if k.dtype == torch.bool or k.is_floating_point():
                probs[name] = k.reshape(-1).to(torch.float64)
            else:
                p = torch.zeros(c, dtype=torch.float64)
                p[k.long()] = 1.0
                probs[name] = p
        with torch.no_grad():
            return self.expected(probs)


def groups_from_channel_grids(model: nn.Module, grids: list) -> list[ChannelGroup]:
    """Channel groups for ``channel``-granularity grids whose channels are read by one next layer.

    A channel grid covers a layer's output rows (and its bias and paired BatchNorm); the layer
    reading those channels is taken to be the next Conv (``groups=1``) or Linear registered after
    it in the same parent with that many input channels (timm/torchvision blocks: ``conv1 -> bn1
    -> act -> conv2``). Anything else - a residual add, a concat, a depthwise conv, no such layer -
    is refused with the module named: use ``granularity: group`` there.
    """
    modules = dict(model.named_modules())
    groups = []
    for grid in grids:
        weight = grid.members[0].target
        if weight.is_recurrent or weight.param.dim() < 2:
            raise ValueError(f"{weight.name}: only Conv/Linear channel grids have a known reader; use granularity group")
        name = weight.name.rpartition(".")[0]
        channels = int(weight.shape[0])
        rows = torch.arange(channels)[:, None]
        slices = [Slice(m.target.name, m.target.name.rpartition(".")[0], 0, rows, "out") for m in grid.members]
        for norm in sorted({m.target.name.rpartition(".")[0] for m in grid.members if m.role == "norm"}):
            slices += [Slice(f"{norm}.{b}", norm, 0, rows, "out") for b in ("running_mean", "running_var")
                       if getattr(modules[norm], b, None) is not None]
        reader = _next_reader(modules, name, channels)
        if reader is None:
            raise ValueError(f"cannot tell which layer reads the channels of {name!r} (a residual add, concat or "
                             f"depthwise conv follows it?); use granularity group")
        slices.append(Slice(f"{reader}.weight", reader, 1, rows, "in"))
        groups.append(ChannelGroup(grid.name, channels, slices))
    return groups


def _next_reader(modules: dict[str, nn.Module], name: str, channels: int) -> str | None:
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or child not in parent._modules:
        return None
    names = list(parent._modules)
    for other in names[names.index(child) + 1:]:
        sub = parent._modules[other]
        if sub is None or not any(p.dim() > 1 for p in sub.parameters()):
            continue  # BatchNorm, activation, pooling, dropout: channel-wise or weight-free
        full = f"{parent_name}.{other}" if parent_name else other
        if isinstance(sub, nn.modules.conv._ConvNd) and sub.groups == 1 and sub.in_channels == channels \
                and not isinstance(sub, _CONV_T):
            return full
        if isinstance(sub, nn.Linear) and sub.in_features == channels:
            return full
        return None
    return None


__all__ = ["Cost", "CostModel", "MacCount", "count_macs", "count_params", "groups_from_channel_grids",
           "weight_positions"]
