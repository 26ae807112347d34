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

* attention heads are found from the attention module (those :data:`hf_sparse.families.ATTENTION_CLASSES`
  lists: timm ``Attention``, transformers ``ViTAttention`` and ``SwinAttention``) instead: one group per head over q/k/v rows and the output projection's
  columns (DepGraph couples qkv features with the projection but not per head);
* a group is dropped when removing its channels would not be exact: a LayerNorm/GroupNorm whose
  statistics run over the channels, a grouped (not depthwise) conv, a module type we cannot slice,
  or channels whose index mapping is not one-to-one;
* layers that keep their width: the output head's outputs (the classes), the stem conv's outputs
  (the input stem of a CNN or ViT) unless ``keep_stem=False``, and every module matching an
  ``exclude`` pattern;
* GRU/LSTM hidden units come from :func:`hf_sparse.structure.recurrent.recurrent_groups` (DepGraph
  does not follow recurrent gate blocks);
* a root whose group DepGraph cannot collect (index lists that never repeat or grow without bound
  around an attention reshape, index arithmetic that raises) is left out alone, with a logged
  reason, instead of taking minutes or ending the discovery (:func:`_all_groups`).

A :class:`Slice` names a tensor (its state-dict name), the module owning it, the ``dim`` along
which the group's channels lie and ``index`` (channels x positions per channel): row ``c`` of
``index`` lists the positions of channel ``c`` along ``dim``. ``role`` is ``"out"`` for the tensors
that *produce* the channel (zeroing them zeroes the channel) and ``"in"`` for the ones reading it.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..families import AttentionBlock, attention_blocks, example_inputs, join_name, unwrap
from ..text import first_line

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


def head_module(model: nn.Module) -> str | None:
    """The name of the module producing the model's outputs (timm ``get_classifier()``, transformers
    ``classifier``/output embeddings, hf_sparse's speech heads), else the last Linear."""
    inner, _, prefix = unwrap(model)
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


def _ancestors_and_self(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") or name == p for p in patterns)


# -- attention heads ------------------------------------------------------------------------------------------


def _head_group(model: nn.Module, name: str, block: AttentionBlock) -> ChannelGroup:
    """One channel per head: its q, k, v rows (weight and bias) and its output-projection columns.

    Exact: with a head's q, k and v rows and biases zero its scores are all 0, the softmax is
    uniform (or follows a per-head bias table, Swin's, whose column goes with the head) and the
    values are 0, so the head emits 0 and its projection columns read zeros."""
    modules = dict(model.named_modules())
    qkv, proj, heads, head_dim = block.qkv, block.proj, block.heads, block.head_dim
    per_head = torch.arange(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]  # (heads, head_dim)
    if len(qkv) == 1:  # fused (3 * heads * head_dim) rows: q block, k block, v block
        width = heads * head_dim
        rows = torch.cat([per_head + k * width for k in range(3)], dim=1)
    else:
        rows = per_head
    slices = []
    for lin in qkv:
        slices.append(Slice(join_name(lin, "weight"), lin, 0, rows, "out"))
        if modules[lin].bias is not None:
            slices.append(Slice(join_name(lin, "bias"), lin, 0, rows, "out"))
    slices.append(Slice(join_name(proj, "weight"), proj, 1, per_head, "in"))
    for tensor, dim in block.per_head:
        slices.append(Slice(tensor, tensor.rpartition(".")[0], dim, torch.arange(heads)[:, None], "in"))
    return ChannelGroup(f"{name}.heads", heads, slices)


# -- DepGraph groups -> our slices ----------------------------------------------------------------------------


class GroupList(list):
    """:func:`find_groups`' answer: the groups, and ``dropped`` (group name -> why it was left out by
    the exactness probe), so a refusal can name them."""

    dropped: dict[str, str]

    def __init__(self, groups: Iterable[ChannelGroup] = (), dropped: Mapping[str, str] | None = None):
        super().__init__(groups)
        self.dropped = dict(dropped or {})

    def dropped_text(self, limit: int = 3) -> str:
        """``name (why); ...`` of the first ``limit`` dropped groups."""
        items = list(self.dropped.items())
        return "; ".join(f"{n} ({why})" for n, why in items[:limit]) + (" ..." if len(items) > limit else "")


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
        return [Slice(join_name(name, attr), name, dim, index, role)] if isinstance(t, torch.Tensor) else []

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


def _check_positions(s: Slice, tensor: torch.Tensor) -> None:
    """A slice must name distinct positions inside its tensor's dim (DepGraph can couple a tensor by a
    dim it does not own: a relative-position bias table's heads with the value channels)."""
    size = int(tensor.shape[s.dim])
    if int(s.index.max()) >= size or s.index.numel() > size or len(s.index.flatten().unique()) != s.index.numel():
        raise _Skip(f"{s.tensor} ({size} positions along dim {s.dim}) cannot hold {s.index.shape[0]} channels "
                    f"x {s.index.shape[1]} positions")


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
            _check_positions(s, target if isinstance(target, nn.Parameter) else getattr(target, s.tensor.rpartition(".")[2]))
            slices.setdefault((s.tensor, s.dim), s)
    root_name = names.get(root.dep.target.module) or param_names.get(root.dep.target.module, "group")
    return ChannelGroup(root_name, channels, list(slices.values()))


#: How often one node of the dependency graph may be reached while one group is collected. DepGraph
#: follows couplings until the index lists it reaches repeat; around some attention reshapes
#: (Visformer's, SAM2 Hiera's) they never do, and one group took minutes. Real groups reach a node a
#: few times (once per path into it).
MAX_VISITS_PER_NODE = 8
#: Around other reshapes (HaloNet's blocked attention) each pass multiplies the index lists instead
#: (8x): a list longer than this many times the model's largest tensor dimension can be no tensor's
#: slice, so the group is left out before it takes minutes and gigabytes.
MAX_INDEX_GROWTH = 1


class _Runaway(Exception):
    """DepGraph's index propagation does not converge for this group."""


def _bounded_group_class(base: type, longest: int) -> type:
    """``Group`` that refuses to grow past :data:`MAX_VISITS_PER_NODE` visits of one node or an index
    list over ``longest``; the group being collected is ``current`` (its items tell which layers a failed
    root reached)."""

    class BoundedGroup(base):
        current = None

        def __init__(self):
            super().__init__()
            self._visits: dict[int, int] = {}
            type(self).current = self

        def add_dep(self, dep, idxs):
            key = id(dep.target)
            self._visits[key] = self._visits.get(key, 0) + 1
            if self._visits[key] > MAX_VISITS_PER_NODE:
                raise _Runaway(f"the index mappings around {dep.target} do not converge")
            if len(idxs) > longest:
                raise _Runaway(f"the index lists grow without bound around {dep.target}")
            super().add_dep(dep, idxs)

    return BoundedGroup


def _all_groups(dg, names: Mapping[nn.Module, str], left_out: dict[str, str]):
    """DepGraph's ``get_all_groups`` (one group per Conv/Linear not yet reached, rooted at its outputs),
    except that a root whose group cannot be collected (an index mapping that fails or does not
    converge) is left out with a logged reason instead of ending the whole discovery; the layers it
    reached are not tried again as roots (they would fail the same way). ``left_out`` gets root -> why."""
    from torch_pruning import ops
    from torch_pruning.dependency import graph as tp_graph

    sizes = [int(d) for m in dg.module2node if isinstance(m, nn.Module)
             for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)) for d in t.shape]
    bounded = _bounded_group_class(tp_graph.Group, MAX_INDEX_GROWTH * max(sizes, default=1))
    original, tp_graph.Group = tp_graph.Group, bounded
    try:
        with _tolerant_concat():  # every group's collection redoes the concat index mappings
            visited: set[int] = set()
            ignored = {id(m) for m in dg.IGNORED_LAYERS_IN_TRACING}
            for m in list(dg.module2node):
                if id(m) in ignored or id(m) in visited or not isinstance(m, (ops.TORCH_CONV, ops.TORCH_LINEAR)):
                    continue
                pruner = dg.get_pruner_of_module(m)
                if pruner is None or pruner.get_out_channels(m) is None:
                    continue
                bounded.current = None
                try:
                    group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
                except Exception as why:  # noqa: BLE001 - the tracer's index arithmetic (ZeroDivisionError...)
                    partial = bounded.current.items if bounded.current is not None else []
                    visited.update(id(it.dep.target.module) for it in partial
                                   if dg.is_out_channel_pruning_fn(it.dep.handler))
                    visited.add(id(m))
                    left_out[str(names.get(m))] = f"{type(why).__name__}: {first_line(why)}"
                    continue
                outs = [it.dep.target.module for it in group.items if dg.is_out_channel_pruning_fn(it.dep.handler)]
                visited.update(id(o) for o in outs)
                if not any(id(o) in ignored for o in outs):
                    yield group
    finally:
        tp_graph.Group = original


@contextlib.contextmanager
def _tolerant_concat():
    """DepGraph's concat index mapping sums the input widths before it checks that each is known
    (TNT, CSPNet's focus stem) and indexes a split's sizes past their end (CvT): a width it cannot
    infer leaves that concat unmapped, as DepGraph means to; the groups through it are then proven or
    dropped like any other."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_concat_index_mapping

    def tolerant(graph, node):
        try:
            return original(graph, node)
        except (TypeError, IndexError):  # sum() over a width of None; a split's size list (CvT)
            return None

    index_mapping.update_concat_index_mapping = tolerant
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


def _where(error: BaseException, model: nn.Module) -> str:
    """`` at <module>`` for the innermost module of ``model`` whose forward the error passed through."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names and names[id(owner)]:
            found = names[id(owner)]
        tb = tb.tb_next
    return f" at {found} ({type(model.get_submodule(found)).__name__})" if found else ""


def _detach_cached_tensors(model: nn.Module) -> None:
    """Tensors a traced forward cached on its modules (LeViT's attention biases, computed under autograd)
    are not leaves and would stop every later ``deepcopy``; the cache keeps their values, detached."""
    for m in model.modules():
        for key, value in list(vars(m).items()):
            if key.startswith("_"):
                continue
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                setattr(m, key, value.detach())
            elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) and v.grad_fn is not None
                                                 for v in value.values()):
                vars(m)[key] = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in value.items()}


def _depgraph_groups(model: nn.Module, inputs, skip_out: set[str], attention: Mapping) -> list[ChannelGroup]:
    from .purge import output_tensor

    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError("finding channel groups needs the torch-pruning package (pip install torch-pruning)") from e
    names = {m: n for n, m in model.named_modules()}
    qkv = {q for block in attention.values() for q in block.qkv}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), _tolerant_concat():
            dg = tp.DependencyGraph().build_dependency(model, inputs, forward_fn=output_tensor, verbose=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure is one clear error, never a wrong model
        raise GroupError(f"cannot trace {type(model).__name__} to find its channel groups"
                         f"{_where(e, model)}: {type(e).__name__}: {first_line(e)}") from None
    finally:
        model.train(was_training)
        _detach_cached_tensors(model)
    param_names = dict(dg._param_to_name)
    param_dims = {id(u.parameters): int(u.pruning_dim) for u in dg.unwrapped_parameters}
    groups, uncollected = [], {}
    for g in _all_groups(dg, names, uncollected):
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
    if uncollected:  # their layers keep their width
        logger.warning("%d channel groups of %s left out (the tracer cannot collect them): %s", len(uncollected),
                       type(model).__name__, "; ".join(f"{n} ({why})" for n, why in list(uncollected.items())[:3])
                       + (" ..." if len(uncollected) > 3 else ""))
    return groups


#: Longest :func:`find_groups` may take (tracing plus the exactness probe), in seconds of CPU time.
DISCOVERY_SECONDS = 30.0


class _TimeUp(BaseException):
    """Raised by the discovery alarm (a BaseException, so no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`_TimeUp` in this block after ``seconds`` of the process's CPU time (main thread,
    POSIX; elsewhere no limit). CPU time, not wall time: other jobs on a busy machine do not count.

    DepGraph is pure Python, so the alarm interrupts it wherever it is; a profiling timer already set
    by the caller is left alone (no limit then)."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_PROF)[0] == 0)
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise _TimeUp()

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def find_groups(model: nn.Module, inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None, *,
                exclude: Iterable[str] = (), keep_stem: bool = True, verify: bool = True,
                time_limit: float | None = DISCOVERY_SECONDS) -> GroupList:
    """The channel groups of ``model`` that can be removed exactly, found on one example input.

    ``inputs`` defaults to :func:`hf_sparse.families.example_inputs`. Modules matching an
    ``exclude`` pattern (fnmatch, or a module name prefix) keep their width: no group writes them.
    The output head never loses outputs; with ``keep_stem`` the first convolution keeps its outputs
    too. Models with GRU/LSTM layers get their hidden units (recurrent groups) only.

    With ``verify`` every group is proven on ``inputs`` before it is returned: a copy with half of
    each group's channels zeroed is purged and must give the zeroed model's outputs; groups whose
    purge fails or differs are left out with a logged reason (:func:`verify_groups`), so a run never
    trains channels that its export would refuse to remove. Discovery stops after ``time_limit``
    seconds of CPU time with a :class:`GroupError` (None: no limit).
    """
    try:
        with _time_limit(time_limit):
            groups = GroupList(_find_groups(model, inputs, list(exclude), keep_stem))
            if verify and groups:
                groups = verify_groups(model, groups, inputs)
    except _TimeUp:
        raise GroupError(f"finding the channel groups of {type(model).__name__} took longer than {time_limit:g} s "
                         "of CPU time (the limit); exclude the modules that make its graph large (sparsity.targets.exclude) "
                         "or use granularity channel") from None
    except GroupError:
        raise
    except Exception as e:  # noqa: BLE001 - the tracer's index mappings, a model that cannot be copied: one clear error
        raise GroupError(f"cannot find the channel groups of {type(model).__name__}: {type(e).__name__}: "
                         f"{first_line(e)}") from None
    return groups


def _find_groups(model: nn.Module, inputs, exclude: list[str], keep_stem: bool) -> list[ChannelGroup]:
    if any(isinstance(m, (nn.GRU, nn.LSTM)) for m in model.modules()):
        from .recurrent import recurrent_groups

        return [g for g in recurrent_groups(model)
                if not any(s.role == "out" and _matches(s.module, exclude) for s in g.slices)]
    if inputs is None:
        inputs = example_inputs(model)
    modules = dict(model.named_modules())
    skip_out = {n for n in modules if n and _matches(n, exclude)}
    head = head_module(model)
    if head is not None:
        skip_out |= {n for n in modules if n == head or n.startswith(head + ".")}
    stem = stem_module(model) if keep_stem else None
    if stem is not None:
        skip_out.add(stem)
    attention = {n: a for n, a in attention_blocks(model).items() if not _matches(n, exclude)}
    groups = _depgraph_groups(model, inputs, skip_out, attention)
    groups += [_head_group(model, n, a) for n, a in attention.items()]
    seen: dict[str, int] = {}
    for g in groups:  # unique names (a module can root one group only, but be safe)
        seen[g.name] = seen.get(g.name, 0) + 1
        if seen[g.name] > 1:
            g.name = f"{g.name}#{seen[g.name]}"
    return groups


@torch.no_grad()
def verify_groups(model: nn.Module, groups: list[ChannelGroup],
                  inputs: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> GroupList:
    """The groups whose removal is exact on ``inputs``; the others are logged (warning) and left out.

    A copy of ``model`` gets its parameters perturbed (so values that are zero at initialisation,
    such as an activation's bias, behave as trained ones) and every other channel of each group
    zeroed (what a structured run's masks leave); purging a subset of the groups from a further copy must then give that copy's outputs
    (within :func:`~hf_sparse.structure.purge.purge_tolerance`).
    All groups are tried at once; when that fails, the set is halved until each failing group is
    found alone (a few purges per failing group), and the rest is tried again together.
    """
    from .purge import mask_channels, output_tensor, purge_model, purge_tolerance

    if inputs is None:
        inputs = example_inputs(model)
    was_training = model.training
    masked = copy.deepcopy(model).eval()
    model.train(was_training)
    gen = torch.Generator().manual_seed(0)
    for p in masked.parameters():  # trained values, not init ones: a zero-initialised activation bias
        if p.is_floating_point():  # or layer scale hides a channel that would not emit zero once trained
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p)
            p.add_(noise * 0.1 * (float(p.detach().abs().float().mean()) + 0.1))
    keep = {g.name: torch.arange(0, g.channels, 2) for g in groups}
    mask_channels(masked, groups, keep)
    reference = output_tensor(masked, inputs)
    tolerance = purge_tolerance(reference)

    recurrent = any(isinstance(m, nn.RNNBase) for m in masked.modules())  # their purge pads in place
    modules = dict(masked.named_modules())

    def problem(subset: list[ChannelGroup]) -> str | None:
        if recurrent:
            small, saved = copy.deepcopy(masked), None
        else:  # purge in place, then put back the touched modules' attributes and tensors (a purge replaces
            small = masked  # tensors, never writes into them): far cheaper than copying a large model
            touched = {a for g in subset for s in g.slices for n in (s.module, s.tensor.rpartition(".")[0])
                       for a in _ancestors_and_self(n)}
            saved = {n: (dict(modules[n].__dict__), dict(modules[n]._parameters), dict(modules[n]._buffers))
                     for n in touched if n in modules}
        try:
            purge_model(small, subset, {g.name: keep[g.name] for g in subset})
            diff = float((output_tensor(small, inputs) - reference).abs().max())
        except Exception as e:  # noqa: BLE001 - any failure to purge or to run the purged copy
            return f"purging it fails ({type(e).__name__}: {first_line(e)})"
        finally:
            for n, (attrs, params, buffers) in (saved or {}).items():
                m = modules[n]
                m.__dict__.clear()
                m.__dict__.update(attrs)
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
        return None if diff <= tolerance else f"its purge changes the outputs by {diff:.3g} (max abs)"

    dropped: dict[str, str] = {}

    def bad_ones(subset: list[ChannelGroup], why: str) -> list[ChannelGroup]:
        """Failing members of ``subset`` (which fails with ``why``), by halving."""
        if len(subset) == 1:
            dropped[subset[0].name] = why
            return subset
        first, second = subset[: len(subset) // 2], subset[len(subset) // 2:]
        if (reason := problem(first)) is None:
            return bad_ones(second, why)  # the failure is in the second half (the caller checks again)
        found = bad_ones(first, reason)
        if (reason := problem(second)) is not None:
            found += bad_ones(second, reason)
        return found

    candidates = list(groups)
    while candidates and (why := problem(candidates)) is not None:
        bad = {id(g) for g in bad_ones(candidates, why)}
        for g in candidates:
            if id(g) in bad:
                dropped.setdefault(g.name, "removed together with other groups, the outputs change")
        candidates = [g for g in candidates if id(g) not in bad]
    found = GroupList(candidates, dropped)
    if dropped:
        logger.warning("%d of %d channel groups of %s left out (not removable exactly): %s", len(dropped),
                       len(groups), type(model).__name__, found.dropped_text())
    return found


__all__ = ["DISCOVERY_SECONDS", "ChannelGroup", "GroupError", "GroupList", "Slice", "find_groups", "head_module", "stem_module",
           "verify_groups"]
