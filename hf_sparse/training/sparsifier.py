"""The Sparsifier: one method applied to the targets of one model, plus density bookkeeping.

It is what SparseTrainer drives; it can also be driven by a plain training loop:

    sp = Sparsifier(model, SparsityConfig(method="gmp", target_density=0.1), seed=0)
    sp.setup(total_steps)
    for step in range(total_steps):
        sp.before_forward(step); loss = model(x).loss; loss.backward(); sp.after_backward(step)
        optimizer.step(); sp.after_step(step, optimizer); optimizer.zero_grad()
    sp.finalize()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config.recipe import SparsityConfig
from ..grids import TargetSpec, resolve_targets
from ..grids.shards import local, sum_counts
from ..methods import get_method
from .fsdp2 import reshard
from .report import SparsityReport


class Sparsifier:
    def __init__(self, model: nn.Module, config: SparsityConfig, seed: int = 0, example_inputs: Any = None):
        """``example_inputs``: a batch at the training resolution, for a ``sparsity.budget``'s MAC count."""
        self.config = config
        spec = TargetSpec(**config.targets.model_dump())
        self.targets = resolve_targets(model, spec)
        if not self.targets:
            raise ValueError(f"sparsity.targets selects no weights of {type(model).__name__}")
        self.method = get_method(config.method)(self.targets, config.method_config(), config.target_density, seed,
                                                granularity=config.granularity_spec(), model=model)
        self.targets = self.method.targets  # granularity group: only the weights a channel group produces
        self.cost = None  # CostModel of the purged model (structured granularities, given example inputs)
        self.cost_names: list[str] = []
        if config.budget is not None:
            self._apply_budget(model, example_inputs)
        elif example_inputs is not None and self.method.granularity.structured:
            try:
                self._cost_model(model, example_inputs)
            except (ValueError, ImportError):
                self.cost = None  # groups unknown (e.g. a residual add after a gated layer): no cost figures
        self.finalized = False
        self.model = model  # FSDP2: its modules are resharded before the method writes into the shards
        self.sharded = self.shard is not None

    @property
    def shard(self) -> tuple[int, int] | None:
        """FSDP2: (rank, world size) the method state is sharded over; None when it is not sharded."""
        lay = next((g.shard for g in self.method.grids if g.shard is not None), None)
        return None if lay is None else (lay.rank, lay.world)

    def state_file(self, name: str = "sparsity_state.pt") -> str:
        """The checkpoint file of this process's method state: ``name``, or under FSDP2 one file per
        rank (``sparsity_state-rank0-of-2.pt``), since each rank holds only its shard."""
        if self.shard is None:
            return name
        stem, dot, ext = name.rpartition(".")
        return f"{stem}-rank{self.shard[0]}-of-{self.shard[1]}{dot}{ext}"

    def _reshard(self) -> None:
        if self.sharded:
            reshard(self.model)

    def _cost_model(self, model: nn.Module, example_inputs: Any) -> None:
        from ..structure.budget import CostModel, groups_from_channel_grids

        groups = getattr(self.method, "channel_groups", None)  # granularity group: the coupled groups
        if not groups and self.method.granularity.gates_every_output:  # channel: each layer's output units
            groups = groups_from_channel_grids(model, self.method.grids)
        if not groups:
            raise ValueError(f"sparsity.budget needs gates on coupled channel groups (granularity: group); "
                             f"granularity {self.config.granularity!r} gives none")
        self.cost = CostModel(model, groups, example_inputs)
        self.cost_names = [g.name for g in groups]

    def _apply_budget(self, model: nn.Module, example_inputs: Any) -> None:
        """Hand the method a cost model of the purged model over the channel groups its gates act on."""
        if example_inputs is None:
            raise ValueError("sparsity.budget needs an example batch at the training resolution to count MACs")
        self._cost_model(model, example_inputs)
        budget = self.config.budget
        self.method.set_budget(budget.kind, budget.fraction, self.cost, self.cost_names)

    # -- what Trainer's optimizer needs ---------------------------------------------------------
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The method's own trainable tensors (gates, auxiliary masks) as extra optimizer param groups."""
        return self.method.param_groups(lr)

    def no_decay_parameter_names(self) -> set[str]:
        """Targeted weights that Trainer's weight decay must leave alone (the method says so)."""
        return set() if self.method.weight_decay_on_targets else {t.name for t in self.targets}

    # -- the step protocol (see methods/base.py) ----------------------------------------------
    def setup(self, total_steps: int) -> None:
        self.method.setup(total_steps)

    def before_forward(self, step: int) -> None:
        if not self.finalized:
            self._reshard()
            self.method.before_forward(step)

    def after_backward(self, step: int) -> None:
        if not self.finalized:
            self.method.after_backward(step)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self.finalized:
            self._reshard()
            self.method.after_step(step, optimizer)

    def finalize(self) -> None:
        """Write the final hard-masked weights (idempotent)."""
        if not self.finalized:
            self._reshard()
            self.method.finalize()
            self.finalized = True

    # -- reporting ----------------------------------------------------------------------------
    @torch.no_grad()
    def per_layer(self) -> dict[str, dict[str, Any]]:
        self._reshard()  # after an evaluation the FSDP2 root holds whole parameters, not its shards
        out = {}
        masks = self.method.hard_masks()
        # FSDP2: each rank counts its shard; the sums are the whole layers'
        counts = sum_counts([t.parameter for t in self.targets], [(int(m.sum()), m.numel()) for m in masks])
        for t, (nonzero, numel) in zip(self.targets, counts):
            out[t.name] = {"density": nonzero / numel, "nonzero": nonzero, "numel": numel,
                           "shape": list(t.parameter.shape), "layer_type": t.layer_type}
        return out

    def density(self, layers: dict[str, dict[str, Any]] | None = None) -> float:
        """Kept fraction of all targeted weights under the current hard masks (or ``layers``)."""
        layers = self.per_layer() if layers is None else layers
        return sum(v["nonzero"] for v in layers.values()) / sum(v["numel"] for v in layers.values())

    def log_metrics(self, per_layer: bool = False) -> dict[str, float]:
        """Scalars for Trainer's logs: the global density and the method's own state.

        ``per_layer=True`` gives the per-layer densities instead: one key per target, too many for
        a console line (a ghostnet has 95), so SparseTrainer sends them to the ``report_to``
        backends (TensorBoard...) only.
        """
        layers = self.per_layer()
        if per_layer:
            return {f"sparsity/density/{name}": v["density"] for name, v in layers.items()}
        logs = {"sparsity/density": self.density(layers)}
        logs.update({f"sparsity/{self.config.method}/{k}": v for k, v in self.method_metrics().items()})
        return logs

    def method_metrics(self) -> dict[str, float]:
        """The method's own numbers (thresholds, counts, multipliers, L0's gate-count density), and
        for structured runs the parameters and MACs per sample of the purged model (``purged_*``)."""
        self._reshard()
        out = {k: float(v) for k, v in self.method.metrics().items()}
        out.update(self.purged_cost() or {})
        return out

    @torch.no_grad()
    def purged_cost(self) -> dict[str, float] | None:
        """Parameters and MACs per sample of the model purged under the current hard masks, and of dense."""
        if self.cost is None:
            return None
        kept = self.cost.kept(dict(zip(self.cost_names, (m.reshape(-1) for m in self.method.group_masks()))))
        return {"purged_params": float(kept.params), "purged_macs": float(kept.macs),
                "dense_params": self.cost.dense_params, "dense_macs": self.cost.dense_macs,
                "purged_params_fraction": float(kept.params) / self.cost.dense_params,
                "purged_macs_fraction": float(kept.macs) / self.cost.dense_macs}

    def report(self, model: nn.Module) -> SparsityReport:
        """The sparsity facts of ``results.json`` and ``sparsity.json``.

        ``method_metrics`` is the method's own final state (e.g. L0's gate-count density for
        ``count: gates``, DNS's splice count); ``achieved_density`` always counts weights.
        """
        layers = self.per_layer()
        return SparsityReport(
            method=self.config.method, target_density=self.config.target_density, target_unit=self.method.target_unit,
            achieved_density=self.density(layers), model_density=model_density(model),
            granularity=str(self.method.granularity), per_layer=layers, structure=self.method.structure(),
            method_metrics=self.method_metrics())

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's state; under FSDP2 this rank's shard of it, tagged with (rank, world size)."""
        self._reshard()
        out = {"method": self.config.method, "state": self.method.state_dict(), "finalized": self.finalized}
        if self.shard is not None:
            out["shard"] = list(self.shard)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.config.method:
            raise ValueError(f"checkpoint holds {state['method']!r} state, the run uses {self.config.method!r}")
        saved = tuple(state["shard"]) if state.get("shard") is not None else None
        if saved != self.shard:
            raise ValueError(f"the method state was saved {_sharding_words(saved)} and the run is "
                             f"{_sharding_words(self.shard)}; resume with the same FSDP2 world size")
        self._reshard()
        self.method.load_state_dict(state["state"])
        self.finalized = state["finalized"]


def _sharding_words(shard: tuple[int, int] | None) -> str:
    return "unsharded" if shard is None else f"as FSDP2 shard {shard[0]} of {shard[1]}"


@torch.no_grad()
def model_density(model: nn.Module) -> float:
    """Nonzero fraction of all parameters of the model."""
    params = list(model.parameters())
    # FSDP2: numel is the whole tensor's, the nonzeros are counted on each shard and summed
    counts = sum_counts(params, [(int(torch.count_nonzero(local(p))),) for p in params]) if params else []
    total = sum(p.numel() for p in params)
    return sum(c[0] for c in counts) / max(total, 1)


def targets_without_weight_decay(model: nn.Module, config: SparsityConfig) -> set[str]:
    """:meth:`Sparsifier.no_decay_parameter_names` before the Sparsifier exists (under FSDP2 Trainer
    makes the optimizer before the model is sharded, and the method is built after)."""
    if getattr(config.method_config(), "weight_decay_on_targets", True):
        return set()
    return {t.name for t in resolve_targets(model, TargetSpec(**config.targets.model_dump()))}


def example_batch(dataset: Any, collator: Any) -> dict[str, Any] | None:
    """One collated training example without its labels (a forward pass at the training resolution)."""
    if dataset is None or collator is None or len(dataset) == 0:
        return None
    batch = collator([dataset[0]])
    return {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, dict) else batch


def dense_report(model: nn.Module) -> SparsityReport:
    """``report`` for a run without sparsity: every density is 1.0 (or what the weights say)."""
    return SparsityReport(model_density=model_density(model))
