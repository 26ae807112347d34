"""``l0``: Hard Concrete L0 gates, controlled by a penalty, a constraint or an augmented Lagrangian.

Each gate multiplies one group of :mod:`hf_sparse.grids` - a weight (``unstructured``), a block, a
weight under an N:M rule, an output unit (``channel``: a conv output channel, a Linear output unit,
or a recurrent hidden unit, whose gate covers its rows in every gate block of both ``weight_ih``
and ``weight_hh`` and its biases) - or a rank-1 component of a factorised Linear
``W = P diag(z) Q`` (``factorized``, Wang et al. 2020; P and Q from an SVD of W).

How the sparsity level is controlled (``control``):

* ``penalty`` (Louizos et al. 2018): minimise ``loss + lambda * E[L0] / N``; the density you get
  is whatever ``lambda`` buys.
* ``constrained`` (Gallego-Posada et al. 2022): minimise ``loss`` subject to
  ``E[density] <= target`` (``constraint: model`` - one constraint, or ``layer`` - one per gated
  layer). Multipliers start at 0 and follow projected dual ascent (:class:`LagrangianController`),
  optionally with dual restarts.
* ``augmented`` (Wang et al. 2020): add ``lambda1 (s - t) + lambda2 (s - t)^2`` where ``s`` is the
  expected *sparsity* ``1 - E[density]`` and ``t`` the target sparsity ``1 - target_density``
  (optionally warmed up linearly from 0); both multipliers by gradient ascent.

Initial gates (``init``): ``constant`` (Louizos) draws every ``log_alpha`` from
``N(log((1 - p) / p), 0.01^2)``, ``p = init_drop_rate``. ``magnitude`` (for a pretrained model)
ranks each layer's groups by their mean ``|w|`` (a factorised component by its singular value) and
opens the largest ones holding ``1 - p`` of the layer's weights: ``log_alpha = +3`` there (median
gate exactly 1, ``P(z != 0) = 0.99``), ``-3`` elsewhere (gate 0, ``P(z != 0) = 0.20``), plus the
same jitter. The model then computes ``W * z_eval`` from the start - a one-shot magnitude pruning to
density ``1 - p`` - so ``eval_on_start`` measures it; the expected density starts at
``0.99 (1 - p) + 0.20 p`` and the control takes it to the target from there.

"Density" counts weights (``count: weights``, a gate costs the weights it controls; a factorised
component costs ``out + in``) or gates (``count: gates``: fraction of units/channels/components).

The effective-weight scheme (see ``base.py``), and why weight decay and Adam act on the real W
-------------------------------------------------------------------------------------------------
The method keeps the real dense weights ``W`` (and ``P``, ``Q`` when factorised). Per step:

* ``before_forward``: draw one noise sample per gate (the counter-based
  :func:`~.hard_concrete.hashed_uniform`, keyed by seed, step and grid: same on every rank, same
  after a resume) and write ``W * z`` into the target.
* ``after_backward``: ``param.grad`` holds ``g = dL/d(W z)``. The sample's ``s`` kept since the
  forward (``keep_sample``, unstructured gates: a transient 4 bytes per gate, freed here), or else
  the sample recomputed from the same key, gives ``z`` and its slope; the gate gradient is
  ``W g dz/dlog_alpha + coef dP/dlog_alpha`` (``coef``: autograd of the penalty / Lagrangian term
  by the grids' expected densities), and the target is set back to the real ``W`` with gradient
  ``g * z``. Unstructured gates do all of this in one fused pass per tensor
  (:mod:`.gate_kernels`, compiled for long runs). So Trainer's optimizer
  steps the *real* weights: AdamW's decoupled weight decay shrinks ``W`` (not ``W z``), and Adam's
  moments see the masked gradients ``g z`` (a closed gate gives a zero gradient; its moments decay
  and the weight keeps its value, so a gate can reopen onto a trained weight).
* ``after_step``: clamp ``log_alpha``, take the dual step, store the updated ``W`` and leave the
  evaluation weights ``W * z_eval`` in the target.

Memory per unstructured gate (fp32 weights), on top of dense training: the real ``W`` 4 bytes,
the logit 4 and its two Adam moments 8, and once frozen the hard mask 1: 17 bytes (``gate_dtype:
bfloat16``: logit 2 and moments 4, 11 bytes). During a step, ``keep_sample`` adds 4 bytes per gate
(freed after backward; ``keep_sample: false`` draws the sample again instead).

Hard masks that meet the target
-------------------------------
The expected density is what the constraint controls; the exported model needs hard 0/1 gates.
Gates that have not polarised make the two differ. So from ``freeze_fraction`` of the run on the
gates are *frozen* to a hard mask and only the weights train (adapting to it). The mask keeps, in each gated layer, the ``k`` gates with the largest ``log_alpha``. Under ``penalty``,
``k = round(E[L0])`` (Wang et al.'s rule). Under ``constrained``/``augmented`` the mask spends
exactly the target budget: per layer (``constraint: layer``), or split over the layers in
proportion to their ``E[L0]`` (``model``), so the hard mask is consistent with the constraint
whether it was still slightly violated or held with slack when the gates froze. Under N:M the mask
keeps the N gates with the largest ``log_alpha`` of every M. Before the freeze,
evaluation uses the deterministic (median) gate of :mod:`.hard_concrete`; after it (and in the
exported model), the binary mask.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..grids import (
    GranularityKinds,
    GroupGrid,
    Member,
    Target,
    build_grids,
    refuse_split,
    sum_over_ranks,
    sum_over_ranks_differentiable,
    top_k_mask,
)
from . import gate_kernels as gk
from . import hard_concrete as hc
from . import register_method
from .base import MethodConfig, SparsityMethod, step_generator
from .constraints import AugmentedLagrangianController, LagrangianController
from .reparam import RealWeights
from .schedules import LinearWarmup, resolve_step


class L0Config(MethodConfig):
    control: Literal["penalty", "constrained", "augmented"] = Field(
        "constrained", description="penalty: loss + penalty*E[L0]/N; constrained: E[density] <= target by dual "
                                   "ascent; augmented: Wang et al.'s lambda1*(s-t) + lambda2*(s-t)^2")
    constraint: Literal["model", "layer"] = Field(
        "model", description="constrained/augmented: one constraint on the whole model, or one per gated layer")
    count: Literal["weights", "gates"] = Field(
        "weights", description="what density counts: weights (a gate costs the weights it controls) or gates "
                               "(fraction of units/channels/components kept)")
    penalty: float = Field(0.1, ge=0, description="penalty control: lambda in loss + lambda * E[L0]/N")
    dual_lr: float = Field(0.05, gt=0, description="constrained/augmented: learning rate of the multipliers")
    dual_restarts: bool = Field(True, description="constrained: reset a multiplier to 0 once its constraint holds")
    gate_lr: float = Field(0.05, gt=0, description="learning rate of the gate logits log_alpha (own param group, "
                                                   "no weight decay)")
    gate_lr_schedule: Literal["constant", "trainer"] = Field(
        "constant", description="constant: the gates keep gate_lr whatever Trainer's LR schedule does, so they can "
                                "still follow the constraint late in training; trainer: they follow the schedule")
    init_drop_rate: float = Field(0.5, gt=0, lt=1, description="initial drop rate p: log_alpha ~ N(log((1-p)/p), 0.01^2)")
    init: Literal["constant", "magnitude"] = Field(
        "constant", description="constant: every gate from init_drop_rate (Louizos); magnitude: from the group's "
                                "weight magnitude, for pretrained models: the largest 1 - init_drop_rate of each "
                                "layer's weights start open (log_alpha +3, gate 1), the rest closed (-3, gate 0)")
    temperature: float = Field(hc.BETA, gt=0, le=1, description="Hard Concrete temperature beta")
    target_warmup: float = Field(0.0, ge=0, le=1, description="constrained/augmented: fraction of training over which "
                                                              "the target ramps linearly from density 1")
    freeze_fraction: float = Field(0.9, gt=0, le=1, description="the gates are frozen to the hard mask from this "
                                                                "fraction of the run on, while the weights adapt")
    batchnorm: bool = Field(True, description="channel gates: where a BatchNorm follows the gated layer, gate the "
                                              "BatchNorm's affine output instead (it would undo a gate in front of it)")
    keep_sample: bool = Field(
        True, description="unstructured gates: keep this step's sample (s, 4 bytes per gate) from before the "
                          "forward until after backward, instead of drawing it again there: about 0.3 ms less "
                          "per step over 235k gates (one CPU thread), 4 bytes per gate more peak memory during the "
                          "step (none between steps, nothing in checkpoints); the same values either way")
    gate_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the gate logits, and so of their gradients and Adam moments: bfloat16 "
                               "halves their 12 bytes per gate but lost 0.35 points of accuracy at density 0.02 "
                               "(LeNet-300-100, 3 seeds); the gate math itself always runs in float32")

    @model_validator(mode="after")
    def _warmup_before_freeze(self):
        if self.target_warmup > self.freeze_fraction:
            raise ValueError("target_warmup must be <= freeze_fraction: the target must be reached "
                             "before the gates freeze")
        return self


#: ``init: magnitude``: log_alpha of the groups that start open / closed. At +-3 the median gate is
#: exactly 1 / 0 (its clamp is reached from +-beta*log(11) = +-1.6) and P(gate != 0) is 0.99 / 0.20.
MAGNITUDE_LOGIT = 3.0


def magnitude_logits(constant: torch.Tensor, keep: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """``init: magnitude``: +MAGNITUDE_LOGIT where ``keep`` (the largest groups), -MAGNITUDE_LOGIT
    elsewhere, plus the same small N(0, 0.01^2) jitter as the constant init (``constant`` is that init)."""
    jitter = constant - (math.log(1.0 - drop_rate) - math.log(drop_rate))
    return jitter + torch.where(keep, MAGNITUDE_LOGIT, -MAGNITUDE_LOGIT).to(constant.dtype)


@dataclass
class _Gates:
    """The gates of one grid: their logits, the tensors they scale and what each gate costs."""

    name: str
    log_alpha: nn.Parameter
    grid: GroupGrid
    real: RealWeights | None  # the real values of the grid's tensors (None when factorised)
    cost: float  # density units per gate (the mean, when gates cost different amounts)
    total: float  # density units of the whole grid
    sizes: torch.Tensor | None = None  # per-gate cost when not uniform (ragged edge blocks)
    P: nn.Parameter | None = None
    Q: nn.Parameter | None = None
    #: unstructured gates over one contiguous tensor: the fused kernels of :mod:`.gate_kernels` apply
    fused: bool = field(default=False, repr=False)
    #: flat index of this process's first gate in the whole grid (the noise of its rows)
    offset: int = field(default=0, repr=False)

    @property
    def num(self) -> int:
        """Gates of the whole grid (on every rank; ``log_alpha`` holds this process's rows), or
        factorised components."""
        return self.grid.total_num if self.P is None else self.log_alpha.numel()

    @property
    def paired(self) -> bool:
        """Whether the gates act after a BatchNorm (the layer itself then trains ungated)."""
        return any(m.role == "norm" for m in self.grid.members)

    def scaled(self, member: Member) -> bool:
        return member.role == "norm" or not self.paired

    def expected(self, beta: float) -> torch.Tensor:
        """Expected density units (differentiable in log_alpha)."""
        if self.sizes is None:
            return self.cost * hc.expected_l0(self.log_alpha, beta)
        return (hc.prob_nonzero(self.log_alpha, beta) * self.sizes).sum()


@register_method
class L0(SparsityMethod):
    """Hard Concrete L0 gates (Louizos 2018) with penalty, constrained or augmented-Lagrangian control."""

    name = "l0"
    Config = L0Config
    budgets = True  # sparsity.budget: a params/MACs budget of the purged model (see set_budget)
    target_density_mode = "optional"
    granularities = GranularityKinds("factorized")
    supports_fsdp2 = True

    @classmethod
    def config_error(cls, config: L0Config, target_density: float | None) -> tuple[tuple[str, ...], str] | None:
        if target_density is None and config.control != "penalty":
            return ("target_density",), f"l0 with control {config.control!r} needs a target_density in (0, 1]"
        return None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.factorized = self.granularity.low_rank
        gen = step_generator(self.seed, 0, "l0-init")
        self.gate_dtype = getattr(torch, cfg.gate_dtype)
        self.compiled = False  # whether the fused gate kernels run compiled (decided in setup)
        self._sums: list[torch.Tensor | None] = []  # this step's sum P(z != 0) per fused grid
        self._key_cache: dict[int, tuple[int, torch.Tensor]] = {}  # grid -> (step, its noise keys)
        self._offsets: dict[int, torch.Tensor] = {}  # grid -> its first gate's flat index, as a tensor
        self._kept_s: dict[int, tuple[int, torch.Tensor]] = {}  # keep_sample: grid -> (step, its sample's s)
        self.gates = [self._factorized_gates(g.weights[0].target, gen) if self.factorized else self._gates(g, gen)
                      for g in self.grids]
        n = len(self.gates) if cfg.constraint == "layer" else 1
        self.controller: LagrangianController | AugmentedLagrangianController | None = None
        if cfg.control == "constrained":
            self.controller = LagrangianController(n, cfg.dual_lr, cfg.dual_restarts)
        elif cfg.control == "augmented":
            self.controller = AugmentedLagrangianController(n, cfg.dual_lr)
        self.frozen = False
        self.masks: list[torch.Tensor] | None = None  # the frozen hard gates, one per grid
        self.freeze_step = 0
        self.target_schedule = LinearWarmup(1.0, float(self.target_density or 1.0), 0)
        self._violation: torch.Tensor | None = None
        self._pinned: tuple[dict[str, Any], float] | None = None  # (gates' param group, its scheduled lr)
        _hook_optimizers(self)
        self._holds = "real"  # what the targets hold now: "real" W, "train" W*z or "eval" W*z_eval
        self.budget: tuple[str, float] | None = None  # ("params" | "macs", fraction of dense)
        self.cost = None  # the CostModel of the purged model under a budget
        self.cost_names: list[str] = []  # the cost model's group name of each grid
        if cfg.init == "magnitude":  # the model computes with the initialised gates from the start (eval_on_start)
            self._write_eval()

    def set_budget(self, kind: str, fraction: float, cost, names: list[str] | None = None) -> None:
        """Constrain the expected ``kind`` ("params"/"macs") of the purged model to ``fraction`` of dense.

        ``cost`` is a :class:`~hf_sparse.structure.budget.CostModel` over the channel groups the
        gates act on; ``names`` gives each grid's group in it (default: the grid names). The
        constraint ``E[cost]/dense <= fraction`` replaces ``E[density] <= target``; the hard mask
        spends the budget (see :meth:`hard_counts`).
        """
        if self.controller is None or self.config.constraint != "model":
            raise ValueError("a budget needs control constrained or augmented with constraint: model")
        refuse_split(self.grids, "a sparsity.budget is not supported with FSDP2-sharded parameters yet")
        names = [g.name for g in self.gates] if names is None else list(names)
        known = dict(zip(cost.group_names, cost.channels))
        for g, n in zip(self.gates, names):
            if known.get(n) != g.num:
                raise ValueError(f"gate grid {g.name!r} ({g.num} gates) has no group of that size in the cost "
                                 f"model (group {n!r}: {known.get(n)} channels)")
        floor = cost.minimum(kind)
        if fraction <= floor:
            raise ValueError(f"a {kind} budget of {fraction:g} cannot be met: the layers outside the channel groups "
                             f"alone cost {floor:.4f} of dense; use a budget above that")
        self.budget, self.cost, self.cost_names = (kind, float(fraction)), cost, names
        self.target_density = float(fraction)
        self.target_schedule = LinearWarmup(1.0, self.target_density, self.target_schedule.steps)

    def _probs(self, hard: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each group's keep probabilities (``hard``: 0/1 masks) keyed by the cost model's names."""
        if hard is not None:
            return {n: k.reshape(-1).to(torch.float64) for n, k in zip(self.cost_names, hard)}
        return {n: hc.prob_nonzero(g.log_alpha, self.config.temperature).reshape(-1)
                for n, g in zip(self.cost_names, self.gates)}

    def build_grids(self, model: nn.Module | None) -> list[GroupGrid]:
        return build_grids(self.targets, self.granularity, model, self.config.batchnorm)

    # -- construction --------------------------------------------------------------------------
    def _gates(self, grid: GroupGrid, gen: torch.Generator) -> _Gates:
        device = grid.members[0].param.device
        # drawn at the whole grid's shape: each rank keeps its rows of the one-process draw
        init = grid.local_sample(lambda shape: hc.init_log_alpha(shape, self.config.init_drop_rate, gen))
        init = init.to(device)
        if self.config.init == "magnitude":
            with torch.no_grad():
                keep = grid.select(grid.score([m.param.detach() for m in grid.weights], "mean"),
                                   1.0 - self.config.init_drop_rate)
                init = magnitude_logits(init, keep, self.config.init_drop_rate)
        la = nn.Parameter(init.to(self.gate_dtype))
        real = RealWeights([m.target for m in grid.members])
        param = grid.members[0].param
        fused = (self.granularity.independent and len(grid.members) == 1
                 and param.shape == la.shape and param.is_contiguous())
        offset = grid.offset
        if self.config.count == "gates":
            return _Gates(grid.name, la, grid, real, 1.0, float(grid.total_num), fused=fused, offset=offset)
        sizes = None if grid.uniform else grid.sizes
        return _Gates(grid.name, la, grid, real, grid.total_numel / grid.total_num, float(grid.total_numel), sizes,
                      fused=fused and sizes is None, offset=offset)

    def _factorized_gates(self, t: Target, gen: torch.Generator) -> _Gates:
        if t.param.dim() != 2:
            raise ValueError(f"factorized gates need 2-D weights; {t.name} has shape {tuple(t.shape)}")
        with torch.no_grad():
            U, S, Vh = torch.linalg.svd(t.param.detach().float(), full_matrices=False)
            root = S.sqrt()
            P = nn.Parameter((U * root).to(t.param.dtype))
            Q = nn.Parameter((root[:, None] * Vh).to(t.param.dtype))
        r = S.numel()
        out, inp = t.shape
        la = hc.init_log_alpha((r,), self.config.init_drop_rate, gen).to(t.param.device)
        if self.config.init == "magnitude":  # a component's magnitude: its singular value
            keep = top_k_mask(S, round((1.0 - self.config.init_drop_rate) * r))
            la = magnitude_logits(la, keep.to(la.device), self.config.init_drop_rate)
        la = nn.Parameter(la.to(self.gate_dtype))
        cost, total = (1.0, float(r)) if self.config.count == "gates" else (float(out + inp), float(out * inp))
        return _Gates(t.name, la, self.grids[self.targets.index(t)], None, cost, total, None, P, Q)

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        cfg = self.config
        self.freeze_step = resolve_step(None, cfg.freeze_fraction, total_steps)
        warmup = resolve_step(None, cfg.target_warmup, total_steps)
        self.target_schedule = LinearWarmup(1.0, float(self.target_density or 1.0), warmup)
        fused = sum(g.num for g in self.gates if g.fused)  # the whole grids: every rank decides alike
        self.compiled = fused > 0 and gk.use_compiled(total_steps, fused)
        with torch.no_grad():  # follow the model if it moved after the method was built
            for g in self.gates:
                dev = g.grid.members[0].param.device
                for p in (g.log_alpha, g.P, g.Q):
                    if p is not None and p.device != dev:
                        p.data = p.data.to(dev)
                if g.real is not None:
                    g.real.follow()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": [g.log_alpha for g in self.gates], "lr": self.config.gate_lr, "weight_decay": 0.0}]
        if self.factorized:
            groups.append({"params": [p for g in self.gates for p in (g.P, g.Q)], "lr": lr, "weight_decay": 0.0})
        return groups

    # -- the training step ---------------------------------------------------------------------
    def _fast(self, g: _Gates) -> bool:
        """Whether grid ``g`` trains through the fused kernels this step (a budget needs autograd)."""
        return g.fused and not self.frozen and self.budget is None

    def _key_pair(self, step: int, i: int) -> tuple[int, int]:
        """Grid ``i``'s noise keys at ``step`` (the same on every rank and after a resume)."""
        return hc.step_keys(self.seed, step, f"l0:{i}")

    def _keys(self, step: int, i: int, device: torch.device) -> torch.Tensor:
        """:meth:`_key_pair` as the int32 tensor the fused kernels take (made once per step and grid:
        before the forward and after backward use the same)."""
        cached = self._key_cache.get(i)
        if cached is None or cached[0] != step or cached[1].device != device:
            cached = self._key_cache[i] = (step, torch.tensor(self._key_pair(step, i), dtype=torch.int32,
                                                               device=device))
        return cached[1]

    def _offset(self, i: int, device: torch.device) -> torch.Tensor:
        """Grid ``i``'s first flat gate index as the int32 0-d tensor the fused kernels take."""
        t = self._offsets.get(i)
        if t is None or t.device != device:
            t = self._offsets[i] = torch.tensor(self.gates[i].offset, dtype=torch.int32, device=device)
        return t

    def _sample(self, step: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, dz/dlog_alpha)`` of grid ``i`` at ``step``; recomputed rather than stored (8 bytes per gate)."""
        g = self.gates[i]
        la = g.log_alpha.detach()
        u = hc.uniform(la.shape, self._key_pair(step, i), g.offset, la.device)
        return hc.sample_and_slope(la, hc.logistic_noise(u), self.config.temperature)

    def _kernel_scalars(self) -> tuple[float, float]:
        """(1 / beta, beta log(-gamma / zeta)): ``P(z != 0) = sigmoid(log_alpha - shift)``."""
        beta = self.config.temperature
        return 1.0 / beta, beta * math.log(-hc.GAMMA / hc.ZETA)

    def before_forward(self, step: int) -> None:
        inv_beta, shift = self._kernel_scalars()
        self._sums = [None] * len(self.gates)
        zs: list[torch.Tensor | None] = []
        fused, entries = [], []
        keep = self.config.keep_sample  # s for after backward (a step's transient, like the gradients)
        with torch.no_grad():
            for i, g in enumerate(self.gates):
                if self.frozen:
                    zs.append(self.masks[i].to(torch.float32))
                elif self._fast(g):
                    la, param = g.log_alpha.detach(), g.grid.members[0].param
                    fused.append(i)
                    entries.append({"la": la.view(-1), "real": g.real.values[0].view(-1), "out": param.view(-1),
                                    "keys": self._keys(step, i, la.device), "offset": self._offset(i, la.device)})
                    if keep:
                        s = torch.empty(la.shape, dtype=torch.float32, device=la.device)
                        entries[-1]["s_out"] = s.view(-1)
                        self._kept_s[i] = (step, s)
                    zs.append(None)
                else:
                    zs.append(self._sample(step, i)[0])
            sums = gk.run_many("train_write_keep" if keep else "train_write", self.compiled, entries,
                               inv_beta=inv_beta, shift=shift)
            for i, total in zip(fused, sums):
                self._sums[i] = total
        self._write(zs, train=True)
        self._holds = "train"

    def after_backward(self, step: int) -> None:
        if self._holds != "train":
            return
        self._holds = "real"
        if self.frozen:
            with torch.no_grad():
                for g, k in zip(self.gates, self.masks):
                    if self.factorized:
                        self._factorized_backward(g, k.to(torch.float32))
                    else:
                        self._chain(g, k.to(torch.float32))
                    g.log_alpha.grad = None  # Trainer zeroes only the model's grads: no stale gate updates
            return
        if self.budget is not None:  # the purged model's cost depends on every gate: autograd
            reg_grads = self._regulariser_gradients(step)
            coefs = [None] * len(self.gates)
        else:
            reg_grads, coefs = [None] * len(self.gates), self._regulariser_coefs(step)
        inv_beta, shift = self._kernel_scalars()
        with torch.no_grad():
            batches: dict[str, tuple[list[int], list[dict]]] = {"train_grads_kept": ([], []), "train_grads": ([], [])}
            for i, (g, coef, r) in enumerate(zip(self.gates, coefs, reg_grads)):
                la = g.log_alpha.detach()
                if self._fast(g):
                    param = g.grid.members[0].param
                    grad = g.grid.members[0].target.grad  # this process's rows
                    kept = self._kept_s.pop(i, None)
                    if grad is not None and grad.is_contiguous():
                        entry = {"la": la.view(-1), "real": g.real.values[0].view(-1), "grad": grad.view(-1),
                                 "param": param.view(-1), "reg": (coef * g.cost).to(torch.float32)}
                        if kept is not None and kept[0] == step:
                            name, entry["s"] = "train_grads_kept", kept[1].view(-1)
                        else:
                            name = "train_grads"
                            entry.update(keys=self._keys(step, i, la.device), offset=self._offset(i, la.device))
                        batches[name][0].append(i)
                        batches[name][1].append(entry)
                        continue
                z, slope = self._sample(step, i)
                d = self._factorized_backward(g, z) if self.factorized else self._chain(g, z)
                if r is None:
                    p = hc.prob_nonzero(la, self.config.temperature)
                    r = coef * (g.cost if g.sizes is None else g.sizes) * (p - p * p)
                g.log_alpha.grad = (d * slope + r).to(la.dtype)
            for name, (fused, entries) in batches.items():
                grads = gk.run_many(name, self.compiled, entries, inv_beta=inv_beta, shift=shift)
                for i, flat in zip(fused, grads):
                    self.gates[i].log_alpha.grad = flat.view(self.gates[i].log_alpha.shape)

    def _chain(self, g: _Gates, z: torch.Tensor) -> torch.Tensor:
        """dL/dz of one grid (the chain rule through ``W * z``); leaves ``grad * z`` in the gradients
        and the real ``W`` in the targets."""
        total = torch.zeros_like(z)
        for member, real in zip(g.grid.members, g.real.values):
            grad = member.target.grad  # this process's rows
            if g.scaled(member) and grad is not None:
                total += member.tiling.reduce(real.float() * grad.float(), "sum")
                grad.mul_(member.expand(z).to(grad.dtype))
        g.real.restore()
        return total

    def _factorized_backward(self, g: _Gates, z: torch.Tensor) -> torch.Tensor:
        """dL/dP = g Q^T diag(z), dL/dQ = diag(z) P^T g, dL/dz_k = (P^T g Q^T)_kk; W itself does not train."""
        p = g.grid.weights[0].param
        if p.grad is None:
            g.P.grad, g.Q.grad = torch.zeros_like(g.P), torch.zeros_like(g.Q)
            return torch.zeros_like(z)
        gf, P, Q = p.grad.float(), g.P.float(), g.Q.float()
        Pg = P.T @ gf  # (r, in)
        g.P.grad = ((gf @ Q.T) * z).to(g.P.dtype)
        g.Q.grad = (z[:, None] * Pg).to(g.Q.dtype)
        p.grad = None  # the optimizer must not step the effective weight
        return (Pg * Q).sum(1)

    def _regulariser_coefs(self, step: int) -> list[torch.Tensor]:
        """d(regulariser)/d(expected density units) per grid; keeps the constraint values.

        Without a budget the penalty / Lagrangian term is a function of the grids' expected units
        ``E_g = sum_j cost_j P_j``, so its gradient in a logit is ``coef_g cost_j dP_j/dlog_alpha_j``:
        autograd runs on the few ``E_g`` only, and the per-gate part is fused with the gate gradient.
        """
        with torch.no_grad():
            local = [s * g.cost if s is not None else g.expected(self.config.temperature)
                     for g, s in zip(self.gates, self._sums)]
            totals = sum_over_ranks_differentiable(self.grids, local)
        leaves = [t.detach().float().requires_grad_() for t in totals]
        with torch.enable_grad():
            reg, self._violation = self._regulariser(step, leaves)
            grads = torch.autograd.grad(reg, leaves, allow_unused=True)
        return [torch.zeros((), device=t.device) if gr is None else gr.detach() for t, gr in zip(leaves, grads)]

    def _regulariser_gradients(self, step: int) -> list[torch.Tensor]:
        """Autograd on the penalty / Lagrangian term of ``log_alpha``; keeps the constraint values."""
        las = [g.log_alpha for g in self.gates]
        with torch.enable_grad():
            reg, self._violation = self._regulariser(step)
            grads = torch.autograd.grad(reg, las, allow_unused=True)
        return [torch.zeros_like(la, dtype=torch.float32) if gr is None else gr.float() for la, gr in zip(las, grads)]

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self._kept_s.clear()  # (normally taken after backward already)
        with torch.no_grad():
            store = self._holds == "real"
            clamp = False  # whether the fused grids clamp their logits in the evaluation write
            if not self.frozen:
                freezing = step + 1 >= self.freeze_step  # the freeze ranks the clamped logits: clamp first
                for g in self.gates:
                    if freezing or not self._fast(g):
                        hc.clamp_(g.log_alpha)
                clamp = not freezing
                if self.controller is not None and self._violation is not None:
                    self.controller.step(self._violation)
                self._violation = None
                if freezing:
                    self._freeze()
        self._write_eval(store, clamp)

    def _pin_gate_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Before an optimizer step: give the gates' param group ``gate_lr`` for this step.

        Trainer's LR scheduler scales every param group, the gates' too; with a decaying schedule
        the gates would stop following the constraint long before they freeze. The scheduled lr is
        put back right after the step (:meth:`_unpin_gate_lr`), so the scheduler sees its own
        value. (Rescaling the step afterwards, ``before + gate_lr / lr * (after - before)``, would
        also be exact in real numbers, but multiplies the rounding of a bfloat16 logit by
        ``gate_lr / lr``, ten and more late in a cosine schedule, and needs a copy of the logits.)
        """
        if self.frozen or self.config.gate_lr_schedule != "constant" or not self.gates:
            return
        first = self.gates[0].log_alpha
        group = next((pg for pg in optimizer.param_groups if any(p is first for p in pg["params"])), None)
        lr = None if group is None else group.get("lr")
        # not ours, an lr-free optimizer, a zero-lr warm-up step (the gates stay), or already gate_lr
        if isinstance(lr, (int, float)) and lr > 0 and lr != self.config.gate_lr:
            self._pinned = (group, lr)
            group["lr"] = self.config.gate_lr

    def _unpin_gate_lr(self) -> None:
        if self._pinned is not None:
            group, lr = self._pinned
            group["lr"] = lr
            self._pinned = None

    def finalize(self) -> None:
        if not self.frozen:
            self._freeze()
        self._write_eval()
        if self.factorized:
            with torch.no_grad():  # a component the mask drops is exactly zero
                for g, k in zip(self.gates, self.masks):
                    g.P.mul_(k.to(g.P.dtype))
                    g.Q.mul_(k.to(g.Q.dtype)[:, None])

    # -- the regulariser -------------------------------------------------------------------------
    def _target(self, step: int) -> float:
        """Target density at ``step``: linear from 1 during warm-up, then the recipe's target."""
        return self.target_schedule(step)

    def _expected(self) -> list[torch.Tensor]:
        """Expected density units per grid (differentiable in log_alpha; of the whole grids)."""
        return sum_over_ranks_differentiable(self.grids, [g.expected(self.config.temperature) for g in self.gates])

    def _across(self, values: list[float]) -> list[float]:
        """Per-grid floats of the whole grids (summed over the ranks)."""
        return sum_over_ranks(self.grids, values)

    def _regulariser(self, step: int, expected: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(term added to the loss, constraint values measured now for the dual step); ``expected``:
        the grids' expected density units (default: computed from the logits)."""
        cfg = self.config
        expected = self._expected() if expected is None else expected
        totals = torch.tensor([g.total for g in self.gates], device=expected[0].device)
        if cfg.control == "penalty":
            return cfg.penalty * torch.stack(expected).sum() / totals.sum(), None
        if self.budget is not None:  # the expected cost of the purged model, as a fraction of dense
            density = self.cost.fraction(self._probs(), self.budget[0]).reshape(1).to(expected[0].dtype)
        elif cfg.constraint == "model":
            density = (torch.stack(expected).sum() / totals.sum()).reshape(1)
        else:
            density = torch.stack(expected) / totals
        target = self._target(step)
        # constrained: g = density - target <= 0; augmented: gap = s - t = (1 - density) - (1 - target).
        values = density - target if cfg.control == "constrained" else target - density
        return self.controller.lagrangian_term(values), values.detach()

    # -- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _freeze(self) -> None:
        """Fix each grid's hard mask: its top-k gates by log_alpha, k from :meth:`hard_counts`
        (N:M: the N largest of every M)."""
        self.masks = []
        for g, k in zip(self.gates, self.hard_counts()):  # over the whole grid, this process's rows
            self.masks.append(g.grid.keep_count(g.log_alpha.detach(), k))
        self.frozen = True

    @torch.no_grad()
    def hard_counts(self) -> list[int]:
        """How many gates each grid keeps in the hard mask.

        ``penalty``: ``round(E[L0])`` per grid (Wang et al.'s rule). ``constrained``/``augmented``:
        the hard mask spends exactly the target budget - per layer for ``constraint: layer``; for
        ``model``, split over the layers in proportion to their ``E[L0]``, which keeps the allocation
        the gates learnt. A constraint that holds with slack (the loss no longer asks for more
        weights) thus still yields the density the user asked for, and one that is still violated
        when the gates freeze yields a mask that satisfies it.
        """
        cfg = self.config
        expected = self._across([float(hc.expected_l0(g.log_alpha, cfg.temperature)) for g in self.gates])
        if self.budget is not None:
            return self._budget_counts(expected)
        if cfg.control == "penalty":
            return [min(g.num, round(e)) for g, e in zip(self.gates, expected)]
        t = float(self.target_density)
        if cfg.constraint == "layer":
            return [_spend([g], [1.0], t * g.total)[0] for g in self.gates]
        return _spend(self.gates, expected, t * sum(g.total for g in self.gates))

    def _top(self, counts: list[int]) -> list[torch.Tensor]:
        """Per grid, the boolean mask of its ``k`` gates with the largest ``log_alpha``."""
        masks = []
        for g, k in zip(self.gates, counts):
            masks.append(g.grid.top_k(g.log_alpha.detach(), k))
        return masks

    @torch.no_grad()
    def _budget_counts(self, expected: list[float]) -> list[int]:
        """Gate counts whose hard mask spends the budget: ``k = round(s * E[L0])`` per grid (at least 1),
        with the largest scale ``s`` whose purged model costs at most the budget (bisection; the
        cost only grows with ``s``), so the allocation the gates learnt is kept."""
        kind, fraction = self.budget

        def counts(s: float) -> list[int]:
            return [min(g.num, max(1, round(s * e))) for g, e in zip(self.gates, expected)]

        def cost(s: float) -> float:
            return float(self.cost.kept(self._probs(self._top(counts(s))))[kind]) / (
                self.cost.dense_params if kind == "params" else self.cost.dense_macs)

        lo, hi = 0.0, max(g.num / max(e, 1e-6) for g, e in zip(self.gates, expected))
        if cost(hi) <= fraction:
            return counts(hi)
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= fraction else (lo, mid)
        return counts(lo)

    def hard_cost(self) -> dict[str, float] | None:
        """Under a budget: the params and MACs fractions of the purged model the current hard gates give."""
        if self.cost is None:
            return None
        with torch.no_grad():
            kept = self.cost.kept(self._probs(self.group_masks()))
        return {"params_fraction": float(kept.params) / self.cost.dense_params,
                "macs_fraction": float(kept.macs) / self.cost.dense_macs}

    def _eval_gates(self) -> list[torch.Tensor]:
        return [self._eval_gate(i) for i in range(len(self.gates))]

    def _eval_gate(self, i: int) -> torch.Tensor:
        if self.frozen:
            return self.masks[i].to(torch.float32)
        return hc.deterministic(self.gates[i].log_alpha.detach(), self.config.temperature)

    def _write(self, gates: list[torch.Tensor | None], train: bool = False) -> None:
        """Write ``W * z`` (or ``P diag(z) Q``) into every target, one gate tensor per grid (``None``:
        a grid a fused kernel has written).

        A layer paired with a BatchNorm trains ungated (the gate scales the BatchNorm's weight and
        bias); for evaluation its closed channels are zeroed as well.
        """
        with torch.no_grad():
            for g, z in zip(self.gates, gates):
                if z is None:
                    continue
                if self.factorized:
                    p = g.grid.weights[0].param
                    p.data.copy_(((g.P.float() * z) @ g.Q.float()).to(p.dtype))
                    continue
                factors = []
                for member, real in zip(g.grid.members, g.real.values):
                    if g.scaled(member):
                        factors.append(member.expand(z).to(real.dtype))
                    else:
                        factors.append(None if train else member.expand((z > 0).to(real.dtype)))
                g.real.write(factors)

    def _write_eval(self, store: bool = False, clamp: bool = False) -> None:
        """Leave the evaluation weights in the targets; ``store``: first keep the stepped real weights;
        ``clamp``: the fused grids first clamp their logits (in the same pass)."""
        inv_beta, _ = self._kernel_scalars()
        zs: list[torch.Tensor | None] = []
        entries = []
        with torch.no_grad():
            for i, g in enumerate(self.gates):
                if self._fast(g):
                    entries.append({"la": g.log_alpha.detach().view(-1), "real": g.real.values[0].view(-1),
                                    "param": g.grid.members[0].param.view(-1)})
                    zs.append(None)
                    continue
                if store and g.real is not None:
                    g.real.store()
                zs.append(self._eval_gate(i))
            gk.run_many("eval_write", self.compiled, entries, inv_beta=inv_beta, store=store, clamp=clamp)
        self._write(zs)
        self._holds = "eval"

    def group_masks(self) -> list[torch.Tensor]:
        """Boolean open gates as they would be exported now."""
        return [z > 0 for z in self._eval_gates()]

    def hard_masks(self) -> list[torch.Tensor]:
        if self.factorized:
            return [t.param.detach() != 0 for t in self.targets]
        return super().hard_masks()

    def structure(self) -> dict[str, list[int]] | None:
        return None if self.factorized else super().structure()

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factorised granularity: ``name -> (P', Q')`` with only the open components, ``W = P' Q'``."""
        out = {}
        for g, z in zip(self.gates, self._eval_gates()):
            k = z > 0
            out[g.name] = ((g.P.detach() * z)[:, k], g.Q.detach()[k])
        return out

    # -- reporting -----------------------------------------------------------------------------
    @property
    def target_unit(self) -> str:
        return self.config.count

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        cfg = self.config
        total = sum(g.total for g in self.gates)
        opened = [o.float() if g.sizes is None else o.float() * g.sizes / g.cost
                  for g, o in zip(self.gates, self.group_masks())]
        out = {
            "expected_density": float(sum(self._expected())) / total,
            "hard_density": sum(n * g.cost for g, n in zip(self.gates, self._across([float(o.sum()) for o in opened])))
            / total,
            "frozen": float(self.frozen),
        }
        if cfg.control == "penalty":
            out["penalty"] = cfg.penalty
            return out
        step = max(self.controller.steps - 1, 0)
        out["target_density"] = self._target(step)
        expected = torch.stack(self._expected()).double()
        totals = torch.tensor([g.total for g in self.gates], dtype=torch.float64)
        density = (expected.sum() / totals.sum()).reshape(1) if cfg.constraint == "model" else expected / totals
        if self.budget is not None:
            density = self.cost.fraction(self._probs(), self.budget[0]).detach().reshape(1)
            out[f"expected_{self.budget[0]}_fraction"] = float(density)
            out.update({f"hard_{k}": v for k, v in self.hard_cost().items()})
        out["violation"] = float((density - out["target_density"]).max())
        if isinstance(self.controller, LagrangianController):
            lam = self.controller.multipliers
            out.update({"lambda": float(lam.mean()), "lambda_max": float(lam.max())})
        else:
            out.update({"lambda1": float(self.controller.lambda1.mean()), "lambda2": float(self.controller.lambda2.mean())})
        return out

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "log_alpha": [g.log_alpha.detach().clone() for g in self.gates],
            "real": [None if g.real is None else g.real.state_dict() for g in self.gates],
            "P": [None if g.P is None else g.P.detach().clone() for g in self.gates],
            "Q": [None if g.Q is None else g.Q.detach().clone() for g in self.gates],
            "frozen": self.frozen,
            "masks": None if self.masks is None else [k.clone() for k in self.masks],
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["log_alpha"]) != len(self.gates):
            raise ValueError(f"l0 state has {len(state['log_alpha'])} gate grids, the model has {len(self.gates)}")
        with torch.no_grad():  # copy into the existing tensors: the optimizer holds references to them
            for i, g in enumerate(self.gates):
                g.log_alpha.copy_(state["log_alpha"][i])
                if g.real is not None:
                    g.real.load_state_dict(state["real"][i])
                for p, saved in ((g.P, state["P"][i]), (g.Q, state["Q"][i])):
                    if p is not None:
                        p.copy_(saved)
        self.frozen = bool(state["frozen"])
        self.masks = None if state["masks"] is None else [
            k.to(g.log_alpha.device) for k, g in zip(state["masks"], self.gates)]
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self._violation = None
        self._holds = "eval"


def _hook_optimizers(method: L0) -> None:
    """Let every optimizer step pin the gates' lr (see :meth:`L0._pin_gate_lr`), for as long as
    ``method`` lives: the hooks hold it weakly and are removed with it."""
    ref = weakref.ref(method)

    def pre(optimizer, args, kwargs):
        m = ref()
        if m is not None:
            m._pin_gate_lr(getattr(optimizer, "optimizer", optimizer))

    def post(optimizer, args, kwargs):
        m = ref()
        if m is not None:
            m._unpin_gate_lr()

    handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
    weakref.finalize(method, lambda: [h.remove() for h in handles])


def _spend(groups: list[_Gates], weights: list[float], budget: float) -> list[int]:
    """Gate counts per group, proportional to ``weights``, whose cost fills ``budget`` (never over).

    Groups that would exceed their size are capped and the rest of the budget is shared among the
    others; fractional counts are floored and the leftover goes by largest remainder, round after
    round while any group's gate still fits.
    """
    counts = [0.0] * len(groups)
    free = list(range(len(groups)))
    left = budget
    while free:
        share = sum(max(weights[i], 1e-12) * groups[i].cost for i in free)
        scale = left / share if share > 0 else 0.0
        full = [i for i in free if max(weights[i], 1e-12) * scale >= groups[i].num]
        if not full:
            for i in free:
                counts[i] = max(weights[i], 1e-12) * scale
            break
        for i in full:
            counts[i] = float(groups[i].num)
            left -= groups[i].num * groups[i].cost
            free.remove(i)
    ints = [min(g.num, math.floor(c + 1e-9)) for g, c in zip(groups, counts)]
    spent = sum(k * g.cost for k, g in zip(ints, groups))
    order = sorted(range(len(groups)), key=lambda i: counts[i] - ints[i], reverse=True)
    added = True
    while added:  # repeat: a group too costly for the leftover must not stop cheaper ones filling it
        added = False
        for i in order:
            if ints[i] < groups[i].num and spent + groups[i].cost <= budget + 1e-6:
                ints[i] += 1
                spent += groups[i].cost
                added = True
    return ints
