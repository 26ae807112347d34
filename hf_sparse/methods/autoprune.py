"""AutoPrune (Xiao, Wang & Rajasekaran, NeurIPS 2019): prune by training auxiliary parameters.

Every targeted weight (``granularity: unstructured``) or every output unit (``structured``: a row of
a Linear, an output channel of a conv, a hidden unit of an RNN/GRU/LSTM layer) gets an auxiliary
parameter ``m``. The network computes with ``W * h(M)``, ``h(m) = 1[m > 0]``. Noise in M's training
never touches W, and a pruned weight keeps its value, so it can come back (recoverability).

With ``g = dL/d(W * h(M))`` (``param.grad`` after backward) the updates are

    W-gradient:  g * h(M)                                   W trains on the masked loss
    M-gradient:  h'(m) * [ sum_unit g * sgn(W)  +  lam * n / N ]

* ``sgn(W)`` replaces ``W`` of the chain rule (the paper's *correlation consistency*): ``m`` moves
  up exactly when the loss wants ``|w|`` to grow, whatever ``|w|`` is.
* ``h'`` is a straight-through estimate (``ste``), the derivative of a surrogate ``phi`` of h:
    identity     phi(m) = m                        h'(m) = 1
    leaky_relu   phi(m) = max(m, a*m)              h'(m) = 1 if m > 0 else a     (a = leaky_slope)
    softplus     phi(m) = log(1 + exp(b*m)) / b    h'(m) = sigmoid(b*m)          (b = softplus_beta)
  ReLU's h' (a = 0) would freeze pruned m for good, hence a > 0.
* The regulariser is ``lam * density`` with ``density = sum_j n_j h(m_j) / N`` (``n_j`` weights per
  element of M, N targeted weights in all), differentiated through the same STE, from
  ``start_fraction`` of the run on. Penalty mode: ``lam = reg_coef``. Target mode: one
  :class:`LagrangianController` constraint ``density / t(step) - 1 <= 0`` (relative, so one
  ``dual_lr`` suits any target), ``lam = multiplier / t(step)``; ``t`` falls from 1 at
  ``start_fraction`` to ``target_density`` at ``end_fraction`` along Zhu & Gupta's cubic. Dual
  restarts (multiplier back to 0 once the density is at or below ``t``) stop the overshoot that
  the lag between M's update and h(M) would otherwise cause.

Choices the paper leaves open, made here: M starts at ``init > 0`` (all kept); M has its own
optimizer group (``mask_lr``, no weight decay); masks change only after an optimizer step; a pruned
weight is held exactly (its gradient is zero; moves by momentum or weight decay are undone and its
optimizer state is cleared); W gets no weight decay unless ``weight_decay_on_targets``. From
``freeze_fraction`` on the masks are frozen and W fine-tunes; in target mode they are first
projected: the m are ranked over all targets (stable sort, ties by position) and the largest kept
up to the target, so the final density is the target to the weight (to a unit when structured).
RNN hidden units share one m between ``weight_ih_lK`` and ``weight_hh_lK`` of the same layer.

Effective weights: between steps the targets hold ``W * h(M)``; the method keeps W. After backward
W is written back so the optimizer updates it; after the step W is saved and ``W * h(M)`` written.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import register_method
from .base import MethodConfig, SparsityMethod, optimizer_states
from .constraints import LagrangianController
from .schedules import resolve_step
from .targets import Target

_GATES = {"LSTM": 4, "GRU": 3}


class AutoPruneConfig(MethodConfig):
    granularity: Literal["unstructured", "structured"] = Field(
        "unstructured", description="one m per weight, or per output unit/channel/hidden unit")
    ste: Literal["identity", "leaky_relu", "softplus"] = Field(
        "softplus", description="straight-through estimate of h'(m): 1, leaky-ReLU slope, or sigmoid(beta*m)")
    leaky_slope: float = Field(0.1, gt=0, le=1, description="leaky_relu: h'(m) for m <= 0 (1 for m > 0)")
    softplus_beta: float = Field(20.0, gt=0, description="softplus: h'(m) = sigmoid(beta * m)")
    init: float = Field(
        0.01, gt=0, description="initial value of every m (> 0: all kept); about 10x mask_lr works best")
    mask_lr: float | None = Field(None, gt=0, description="learning rate of M (default: the training learning rate)")
    reg_coef: float | None = Field(
        None, ge=0, description="penalty mode: lam of lam * density (loss units); not with target_density")
    dual_lr: float = Field(20.0, gt=0, description="target mode: dual ascent step of the multiplier")
    dual_restarts: bool = Field(True, description="target mode: reset the multiplier to 0 whenever density <= t(step)")
    start_fraction: float = Field(0.1, ge=0, le=1, description="the regulariser acts from this fraction of the run")
    end_fraction: float = Field(
        0.4, ge=0, le=1, description="target mode: t(step) falls from 1 (at start_fraction) to the target here")
    freeze_fraction: float = Field(
        0.7, ge=0, le=1, description="masks are frozen from here on (target mode: first projected to the target)")
    weight_decay_on_targets: bool = Field(
        False, description="let Trainer's weight decay act on the kept targeted weights (it hurts recoverability)")

    @model_validator(mode="after")
    def _phases_in_order(self):
        if not self.start_fraction <= self.end_fraction <= self.freeze_fraction:
            raise ValueError(f"need start_fraction <= end_fraction <= freeze_fraction, got {self.start_fraction}, "
                             f"{self.end_fraction}, {self.freeze_fraction}")
        return self


def ste_grad(m: torch.Tensor, config: AutoPruneConfig) -> torch.Tensor:
    """h'(m) under the configured straight-through estimate (see the module docstring)."""
    if config.ste == "identity":
        return torch.ones_like(m)
    if config.ste == "leaky_relu":
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, config.leaky_slope))
    return torch.sigmoid(config.softplus_beta * m)


class _Layout:
    """How one target maps onto its group's m: ``gates`` blocks of rows per unit, or one m per weight."""

    def __init__(self, target: Target, structured: bool):
        self.structured = structured
        shape = target.shape
        self.gates = _GATES.get(target.layer_type, 1) if target.is_recurrent else 1
        self.units = shape[0] // self.gates
        self.shape = shape if not structured else torch.Size([self.units])
        if structured and self.units * self.gates != shape[0]:
            raise ValueError(f"{target.name}: {shape[0]} rows do not split into {self.gates} gates")
        self.tail = (1,) * (len(shape) - 1)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Group-shaped -> broadcastable to the target."""
        return x.repeat(self.gates).view(-1, *self.tail) if self.structured else x

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """Target-shaped -> group-shaped, summing over each unit's weights."""
        return y.reshape(self.gates, self.units, -1).sum((0, 2)) if self.structured else y


def _group_key(target: Target, structured: bool) -> tuple:
    """Targets with the same key share one m: the ih/hh matrices of one recurrent layer and direction."""
    if structured and target.is_recurrent:
        return (id(target.module), target.attr.split("_", 2)[2])  # weight_ih_l0_reverse -> l0_reverse
    return (target.name,)


@register_method
class AutoPrune(SparsityMethod):
    name = "autoprune"
    Config = AutoPruneConfig
    target_density_mode = "optional"

    def __init__(self, targets, config, target_density, seed=0):
        super().__init__(targets, config, target_density, seed)
        problem = self.config_error(config, target_density)
        if problem:
            raise ValueError(f"sparsity.{'.'.join(problem[0])}: {problem[1]}")
        self.structured = structured = config.granularity == "structured"
        self.weight_decay_on_targets = config.weight_decay_on_targets  # read by SparseTrainer
        self.layouts = [_Layout(t, structured) for t in targets]
        keys: dict[tuple, int] = {}
        self.group_of = [keys.setdefault(_group_key(t, structured), len(keys)) for t in targets]
        self.members: list[list[int]] = [[] for _ in keys]
        for i, g in enumerate(self.group_of):
            self.members[g].append(i)
        self.M: list[nn.Parameter] = []
        self.sizes: list[torch.Tensor] = []  # weights per element of each m
        for idx in self.members:
            first = self.layouts[idx[0]]
            p = targets[idx[0]].param
            if any(self.layouts[i].shape != first.shape for i in idx):
                raise ValueError(f"{targets[idx[0]].name}: recurrent matrices of one layer disagree on hidden units")
            self.M.append(nn.Parameter(torch.full(first.shape, config.init, device=p.device)))
            self.sizes.append(sum(self.layouts[i].reduce(torch.ones_like(targets[i].param, dtype=torch.float32))
                                  for i in idx))
        self.numel = sum(t.numel() for t in targets)
        self.dense = [t.param.detach().clone() for t in targets]
        self.keeps = [m.detach() > 0 for m in self.M]  # h(M) in effect; changes only in after_step
        self.fmasks: list[torch.Tensor] = []  # h(M) per target, as float broadcastable to the weight
        self._refresh_fmasks()
        self.frozen = False
        self.ever_restored = [torch.zeros_like(m, dtype=torch.bool) for m in self.M]
        self.restore_events = 0  # weights whose mask went 0 -> 1, cumulative (a weight may count twice)
        self.controller = LagrangianController(1, config.dual_lr, config.dual_restarts) if target_density else None
        self.constraint_target = 1.0
        self.start = self.end = self.freeze_at = 0
        self.last_step = -1

    @classmethod
    def config_error(cls, config: AutoPruneConfig, target_density: float | None) -> tuple[tuple[str, ...], str] | None:
        """(key below ``sparsity``, message) when params and target_density do not go together."""
        if target_density is None and config.reg_coef is None:
            return ("params", "reg_coef"), "autoprune needs sparsity.target_density or params.reg_coef"
        if target_density is not None and config.reg_coef is not None:
            return ("params", "reg_coef"), ("give either sparsity.target_density (the multiplier is "
                                            "learned) or params.reg_coef, not both")
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.start = resolve_step(None, c.start_fraction, total_steps)
        self.end = resolve_step(None, c.end_fraction, total_steps)
        self.freeze_at = resolve_step(None, c.freeze_fraction, total_steps)
        self._follow_device()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.M), "lr": self.config.mask_lr or lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def before_forward(self, step: int) -> None:
        self._follow_device()
        self._write_effective()

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        coef = (self.reg_coef() if step >= self.start else 0.0) / self.numel
        for g, m in enumerate(self.M):
            corr = torch.zeros_like(m)
            for i in self.members[g]:
                p = self.targets[i].param
                if p.grad is not None:
                    if not self.frozen:
                        corr += self.layouts[i].reduce(p.grad.float() * torch.sign(self.dense[i]))
                    p.grad.mul_(self.fmasks[i])
                p.copy_(self.dense[i])
            if self.frozen:
                m.grad = None  # frozen masks: the optimizer skips M
            else:
                reg = coef * self.sizes[g] if self.structured else coef
                m.grad = ste_grad(m, self.config).mul_(corr.add_(reg))

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.last_step = step
        for i, t in enumerate(self.targets):
            # Take the stepped W where kept; pruned weights had zero gradient, so keep their old
            # values (undoing any move by momentum or weight decay). lerp with a 0/1 weight is exact.
            self.dense[i].lerp_(t.param, self.fmasks[i])
        if not self.frozen:
            self._set_masks([m.detach() > 0 for m in self.M])
            if self.controller is not None and step >= self.start:
                self.constraint_target = self.target_at(step)
                self.controller.step(torch.tensor([self.density() / self.constraint_target - 1.0]))
            if self.total_steps and step + 1 >= self.freeze_at:
                self.freeze()
        for i, t in enumerate(self.targets):
            for s in optimizer_states(optimizer, t.param):
                s.mul_(self.fmasks[i])  # no stale moments for pruned weights
        self._write_effective()

    def finalize(self) -> None:
        """Meet the target (if training stopped before the final phase) and write ``W * h(M)``."""
        if self.controller is not None and not self.frozen:
            self.freeze()
        with torch.no_grad():
            self._write_effective()

    # -- masks ---------------------------------------------------------------------------------
    def keep(self, g: int) -> torch.Tensor:
        """The boolean mask h(m) of group ``g`` in effect (fixed in the final phase)."""
        return self.keeps[g]

    def density(self) -> float:
        """Kept fraction of the targeted weights."""
        return sum(self._kept(g, self.keep(g)) for g in range(len(self.M))) / self.numel

    def target_at(self, step: int) -> float:
        """t(step): cubic from 1 at ``start`` to target_density at ``end`` (Zhu & Gupta's shape)."""
        d = self.target_density
        span = self.end - self.start
        progress = 1.0 if span <= 0 else min(1.0, max(0.0, (step + 1 - self.start) / span))
        return d + (1.0 - d) * (1.0 - progress) ** 3

    def reg_coef(self) -> float:
        """lam on density: the fixed penalty coefficient, or multiplier / t(step) in target mode."""
        if self.controller is None:
            return self.config.reg_coef
        return float(self.controller.multipliers[0]) / self.constraint_target

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the masks for the final phase; in target mode keep the largest m up to the target."""
        if self.controller is not None:
            self._set_masks(self.project(self.target_density))
        self.frozen = True

    def project(self, density: float) -> list[torch.Tensor]:
        """Keep-masks holding the largest m over all targets, as close to ``density`` as units allow.

        Ties are broken by position (a stable sort), so every rank makes the same choice.
        """
        values = torch.cat([m.detach().flatten().float().cpu() for m in self.M])
        sizes = torch.cat([s.flatten().double().cpu() for s in self.sizes])
        order = torch.sort(values, descending=True, stable=True).indices
        counts = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sizes[order], 0)])
        n_keep = int(torch.argmin((counts - density * self.numel).abs()))
        flat = torch.zeros(values.numel(), dtype=torch.bool)
        flat[order[:n_keep]] = True
        return [k.view_as(m).to(m.device) for k, m in zip(flat.split([m.numel() for m in self.M]), self.M)]

    def _set_masks(self, new: list[torch.Tensor]) -> None:
        """Put ``new`` masks in effect, counting the weights that come back."""
        for g, (old, keep) in enumerate(zip(self.keeps, new)):
            back = keep & ~old
            self.restore_events += self._kept(g, back)
            self.ever_restored[g] |= back
        self.keeps = new
        self._refresh_fmasks()

    def _kept(self, g: int, flags: torch.Tensor) -> int:
        """Number of weights behind the True entries of group ``g``'s ``flags``."""
        return int((self.sizes[g] * flags).sum()) if self.structured else int(flags.count_nonzero())

    def _refresh_fmasks(self) -> None:
        self.fmasks = [self.layouts[i].expand(self.keeps[g]).to(t.param.dtype)
                       for i, (t, g) in enumerate(zip(self.targets, self.group_of))]

    def _write_effective(self) -> None:
        for i, t in enumerate(self.targets):
            torch.mul(self.dense[i], self.fmasks[i], out=t.param)

    def _follow_device(self) -> None:
        """Keep M and W where the model is (it may move after the method was built)."""
        moved = False
        for i, t in enumerate(self.targets):
            if self.dense[i].device != t.param.device:
                self.dense[i] = self.dense[i].to(t.param.device)
        for g, m in enumerate(self.M):
            dev = self.targets[self.members[g][0]].param.device
            if m.device != dev:
                moved = True
                m.data = m.data.to(dev)  # same Parameter object: the optimizer keeps tracking it
                for lst in (self.sizes, self.keeps, self.ever_restored):
                    lst[g] = lst[g].to(dev)
        if moved:
            self._refresh_fmasks()

    # -- reporting ---------------------------------------------------------------------------
    def hard_masks(self) -> list[torch.Tensor]:
        return [self.layouts[i].expand(self.keep(self.group_of[i])).expand(t.shape).clone()
                for i, t in enumerate(self.targets)]

    def metrics(self) -> dict[str, float]:
        restored = sum(self._kept(g, e) for g, e in enumerate(self.ever_restored))
        active = not self.frozen and self.last_step >= self.start
        out = {"density": self.density(), "reg_coef": self.reg_coef() if active else 0.0, "restored_weights": restored,
               "restore_events": self.restore_events, "frozen": float(self.frozen)}
        if self.controller is not None:
            out["constraint_target"] = self.constraint_target
        return out

    def structure(self) -> dict[str, list[int]] | None:
        if self.config.granularity != "structured":
            return None
        return {t.name: torch.nonzero(self.keep(self.group_of[i])).flatten().tolist()
                for i, t in enumerate(self.targets)}

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"m": [m.detach().clone() for m in self.M], "dense": [w.clone() for w in self.dense],
                "frozen": self.frozen, "keeps": [k.clone() for k in self.keeps],
                "ever_restored": [e.clone() for e in self.ever_restored], "restore_events": self.restore_events,
                "constraint_target": self.constraint_target, "last_step": self.last_step,
                "controller": self.controller.state_dict() if self.controller is not None else {}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, key in ((self.M, "m"), (self.dense, "dense"), (self.keeps, "keeps"),
                         (self.ever_restored, "ever_restored")):
            for d, s in zip(dst, state[key], strict=True):
                d.copy_(s)
        self._refresh_fmasks()
        self.frozen = bool(state["frozen"])
        self.restore_events = int(state["restore_events"])
        self.constraint_target = float(state["constraint_target"])
        self.last_step = int(state["last_step"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
