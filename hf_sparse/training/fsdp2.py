"""What SparseTrainer does differently when Accelerate runs FSDP2 (``fsdp_config: {fsdp_version: 2}``).

* The Sparsifier is built after Accelerate has sharded the model (targets are then resolved by
  name on the sharded model and every piece of method state is a shard of its parameter).
* torch.distributed.checkpoint saves and loads the optimizer state by the model's parameter names.
  The method's own tensors (L0's gate logits) are not model parameters, so their param groups
  step aside while Trainer saves or loads the optimizer, and their state travels in the method's
  per-rank checkpoint file instead (it is a shard like the logits themselves).
* Export gathers the full state dict on every rank and loads it, on the main process, into an
  unsharded skeleton of the model made before sharding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import model_has_dtensor
from torch import nn

__all__ = ["ExportSkeleton", "full_state_dict", "gather_model", "groups_state", "load_groups_state", "model_has_dtensor",
           "own_groups", "reshard", "without_groups"]


class ExportSkeleton:
    """An unsharded copy of a model on the meta device (no memory), made before FSDP2 shards it.

    Non-persistent buffers are not in a state dict, so their values are kept beside it.
    """

    def __init__(self, model: nn.Module):
        persistent = set(model.state_dict())
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers() if name not in persistent}
        self.model = copy.deepcopy(model).to("meta")

    def load(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = self.model.to_empty(device="cpu")
        model.load_state_dict(state_dict)
        for name, value in self.buffers.items():
            model.get_buffer(name).copy_(value)
        return model


def gather_model(model: nn.Module, skeleton: ExportSkeleton | None) -> nn.Module | None:
    """The whole model from its FSDP2 shards, on the process that holds ``skeleton``; None on the
    others. A collective: every process calls it."""
    full = full_state_dict(model)
    return None if skeleton is None else skeleton.load(full)


def reshard(model: nn.Module | None) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state.

    A forward without backward (evaluation) leaves the root group's parameters unsharded, and the
    next forward would not all-gather again; the method writes into the shards, so it reshards
    first.
    """
    if model is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on CPU, for exporting a model trained under FSDP2.

    A collective: call it on every rank; rank 0 gets the tensors, the other ranks an empty dict.
    Load it into an unsharded copy of the model and pass that to ``save_sparse_checkpoint``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def own_groups(optimizer: torch.optim.Optimizer, own_params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """The optimizer's param groups that hold only the method's own tensors."""
    ids = {id(p) for p in own_params}
    return [g for g in optimizer.param_groups if g["params"] and all(id(p) in ids for p in g["params"])]


@contextlib.contextmanager
def without_groups(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> Iterator[None]:
    """``optimizer`` without ``groups`` (the last ones) and their state for the duration."""
    if not groups:
        yield
        return
    state = {p: optimizer.state.pop(p) for g in groups for p in g["params"] if p in optimizer.state}
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if all(g is not o for o in groups)]
    try:
        yield
    finally:  # loading replaces the list of groups: extend the one the optimizer holds now
        optimizer.param_groups.extend(groups)
        optimizer.state.update(state)


def groups_state(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Hyperparameters and per-tensor state (e.g. Adam moments) of ``groups``: this rank's shards."""
    return {"groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
            "state": [[dict(optimizer.state.get(p, {})) for p in g["params"]] for g in groups]}


def load_groups_state(optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], saved: dict[str, Any]) -> None:
    if len(saved["groups"]) != len(groups):
        raise ValueError(f"the checkpoint holds {len(saved['groups'])} method param groups, the run has {len(groups)}")
    for group, hyper, states in zip(groups, saved["groups"], saved["state"]):
        group.update(hyper)
        for p, state in zip(group["params"], states):
            # per-weight tensors to the parameter's device; Adam's scalar step stays where it was saved
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v for k, v in state.items()}
