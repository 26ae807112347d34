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

from ..methods import get_method
from ..methods.targets import TargetSpec, resolve_targets
from .recipe import SparsityConfig
from .report import SparsityReport


class Sparsifier:
    def __init__(self, model: nn.Module, config: SparsityConfig, seed: int = 0):
        self.config = config
        spec = TargetSpec(**config.targets.model_dump())
        self.targets = resolve_targets(model, spec)
        if not self.targets:
            raise ValueError(f"sparsity.targets selects no weights of {type(model).__name__}")
        self.method = get_method(config.method)(self.targets, config.method_config(), config.target_density, seed,
                                                granularity=config.granularity_spec(), model=model)
        self.finalized = False

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
            self.method.before_forward(step)

    def after_backward(self, step: int) -> None:
        if not self.finalized:
            self.method.after_backward(step)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self.finalized:
            self.method.after_step(step, optimizer)

    def finalize(self) -> None:
        """Write the final hard-masked weights (idempotent)."""
        if not self.finalized:
            self.method.finalize()
            self.finalized = True

    # -- reporting ----------------------------------------------------------------------------
    @torch.no_grad()
    def per_layer(self) -> dict[str, dict[str, Any]]:
        out = {}
        for t, m in zip(self.targets, self.method.hard_masks()):
            nonzero = int(m.sum())
            out[t.name] = {"density": nonzero / m.numel(), "nonzero": nonzero, "numel": m.numel(),
                           "shape": list(t.shape), "layer_type": t.layer_type}
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
        """The method's own numbers (thresholds, counts, multipliers, L0's gate-count density)."""
        return {k: float(v) for k, v in self.method.metrics().items()}

    def report(self, model: nn.Module) -> SparsityReport:
        """The sparsity facts of ``results.json`` and ``sparsity.json``.

        ``method_metrics`` is the method's own final state (e.g. L0's gate-count density for
        ``count: gates``, DNS's splice count); ``achieved_density`` always counts weights.
        """
        layers = self.per_layer()
        return SparsityReport(
            method=self.config.method, target_density=self.config.target_density,
            achieved_density=self.density(layers), model_density=model_density(model),
            granularity=str(self.method.granularity), per_layer=layers, structure=self.method.structure(),
            method_metrics=self.method_metrics())

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.config.method, "state": self.method.state_dict(), "finalized": self.finalized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.config.method:
            raise ValueError(f"checkpoint holds {state['method']!r} state, the run uses {self.config.method!r}")
        self.method.load_state_dict(state["state"])
        self.finalized = state["finalized"]


@torch.no_grad()
def model_density(model: nn.Module) -> float:
    """Nonzero fraction of all parameters of the model."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return nonzero / max(total, 1)


def dense_report(model: nn.Module) -> SparsityReport:
    """``report`` for a run without sparsity: every density is 1.0 (or what the weights say)."""
    return SparsityReport(model_density=model_density(model))
