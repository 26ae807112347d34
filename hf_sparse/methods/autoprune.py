"""AutoPrune (Xiao, Wang & Rajasekaran, NeurIPS 2019): prune by training auxiliary parameters.

Every group of targeted weights (:mod:`hf_sparse.grids`: a weight, a block, an output unit - a row of
a Linear, an output channel of a conv, a hidden unit of an RNN/GRU/LSTM layer) gets an auxiliary
parameter ``m``. The network computes with ``W * h(M)``, ``h(m) = 1[m > 0]``. Noise in M's training
never touches W, and a pruned weight keeps its value, so it can come back (recoverability).

With ``g = dL/d(W * h(M))`` (``param.grad`` after backward) the updates are

    W-gradient:  g * h(M)                                   W trains on the masked loss
    M-gradient:  h'(m) * [ sum_group g * sgn(W)  +  lam * n / N ]

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

Choices the paper leaves open, made here: M starts at ``init > 0`` (all kept; ``init: magnitude``
spreads it over ``(0, 2 init_scale]`` in the order of the groups' mean ``|w|`` per layer, so a
pretrained model's smallest weights are the first the regulariser prunes); M has its own
optimizer group (``mask_lr``, no weight decay); masks change only after an optimizer step; a pruned
weight is held exactly (its gradient is zero; moves by momentum or weight decay are undone, and
its optimizer state is zeroed when it is restored); W gets no weight decay unless ``weight_decay_on_targets``. From
``freeze_fraction`` on the masks are frozen and W fine-tunes; in target mode they are first
projected: the m are ranked over all targets (stable sort, ties by position) and the largest kept
up to the target, so the final density is the target to the weight (to a group otherwise; N:M keeps
the N largest m of every M). RNN hidden units share one m between ``weight_ih_lK`` and
``weight_hh_lK`` of the same layer. At channel granularity a unit's biases and the BatchNorm that
follows its layer are masked with it, so a pruned channel emits exactly zero.

Effective weights: between steps the targets hold ``W * h(M)``; the method keeps W
(:class:`~.reparam.RealWeights`). After backward W is written back so the optimizer updates it;
after the step W is saved and ``W * h(M)`` written.

Grids of one m per weight (unstructured, N:M) run each hook as one pass per tensor
(:mod:`.gate_kernels`: ``ap_grads`` after backward; ``ap_step`` after the step, which also takes the
new mask, marks and counts the restored weights and zeroes their optimizer state), compiled for
long runs like L0's kernels (:func:`~.gate_kernels.use_compiled`), eager otherwise; both give the
same values as the per-op rules (M's gradient to float32 rounding when compiled). Their h(M) is the
bool mask itself, viewed as uint8 (no float copy: 18 bytes per weight of state instead of 22).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..grids import density_of, keep_top, kept_weights, local, sum_over_ranks
from . import gate_kernels as gk
from . import register_method
from .base import MethodConfig, SparsityMethod, optimizer_states
from .constraints import LagrangianController
from .reparam import RealWeights
from .schedules import CubicSchedule, StepWindow, resolve_step


class AutoPruneConfig(MethodConfig):
    ste: Literal["identity", "leaky_relu", "softplus"] = Field(
        "softplus", description="straight-through estimate of h'(m): 1, leaky-ReLU slope, or sigmoid(beta*m)")
    leaky_slope: float = Field(0.1, gt=0, le=1, description="leaky_relu: h'(m) for m <= 0 (1 for m > 0)")
    softplus_beta: float = Field(20.0, gt=0, description="softplus: h'(m) = sigmoid(beta * m)")
    init: Annotated[float, Field(gt=0)] | Literal["magnitude"] = Field(
        0.01, description="initial value of every m (> 0: all kept); about 10x mask_lr works best. 'magnitude' "
                          "(for pretrained models): all kept, m ranked like the group's mean |w| in its layer, "
                          "m = init_scale * 2 * rank / groups (the smallest weights nearest to being pruned)")
    init_scale: float = Field(0.01, gt=0, description="init: magnitude: the mean initial m")
    mask_lr: float | None = Field(None, gt=0, description="learning rate of M (default: the training learning rate)")
    reg_coef: float | None = Field(
        None, ge=0, description="penalty mode: lam of lam * density (loss units); not with target_density")
    dual_lr: float = Field(20.0, gt=0, description="target mode: dual ascent step of the multiplier")
    dual_restarts: bool = Field(True, description="target mode: reset the multiplier to 0 whenever density <= t(step)")
    start_fraction: float = Field(0.1, ge=0, le=1, description="the regulariser acts from this fraction of the run")
    end_fraction: float = Field(
        0.4, ge=0, le=1, description="target mode: t(step) falls from 1 (at start_fraction) to the target here")
    freeze_fraction: float = Field(
        0.7, ge=0, le=1, description="masks are frozen from this fraction of the run on (target mode: first "
                                     "projected to the target)")
    weight_decay_on_targets: bool = Field(
        False, description="let Trainer's weight decay act on the kept targeted weights (it hurts recoverability)")

    @model_validator(mode="after")
    def _phases_in_order(self):
        if not self.start_fraction <= self.end_fraction <= self.freeze_fraction:
            raise ValueError(f"need start_fraction <= end_fraction <= freeze_fraction, got {self.start_fraction}, "
                             f"{self.end_fraction}, {self.freeze_fraction}")
        return self


#: every this many steps the second moments of the targets are floored at V_FLOOR (see
#: ``AutoPrune._reset_moments``): from V_FLOOR a decay by beta2 >= 0.9 stays normal for 64 steps.
V_FLOOR_EVERY = 64
V_FLOOR = 2.0**-116


def ste_grad(m: torch.Tensor, config: AutoPruneConfig) -> torch.Tensor:
    """h'(m) under the configured straight-through estimate (see the module docstring)."""
    if config.ste == "identity":
        return torch.ones_like(m)
    if config.ste == "leaky_relu":
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, config.leaky_slope))
    return torch.sigmoid(config.softplus_beta * m)


@register_method
class AutoPrune(SparsityMethod):
    name = "autoprune"
    Config = AutoPruneConfig
    target_density_mode = "optional"
    supports_fsdp2 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        self.weight_decay_on_targets = config.weight_decay_on_targets
        self.M = [nn.Parameter(self._initial_m(g)) for g in self.grids]
        self.real = RealWeights([m.target for m in self.covered])
        self.numel = sum(g.total_numel for g in self.grids)  # the whole grids' weights, on every rank
        # grid -> its members' positions in ``covered`` (and in ``real.values`` and ``_factors``)
        ends = [0]
        for g in self.grids:
            ends.append(ends[-1] + len(g.members))
        self._spans = [range(a, b) for a, b in zip(ends, ends[1:])]
        #: grids of one m per weight over one contiguous tensor: the fused passes of :mod:`.gate_kernels`
        self._fused = [g.single and len(g.members) == 1 and tuple(g.members[0].param.shape) == tuple(g.shape)
                       and g.members[0].param.is_contiguous() for g in self.grids]
        self.compiled = False  # whether the fused passes run compiled (decided in setup)
        self.masks = [m.detach() > 0 for m in self.M]  # h(M) in effect; changes only in after_step
        # h(M) per covered tensor, broadcastable to it: float, or the bool mask viewed as uint8 for a fused grid
        self._factors: list[torch.Tensor] = []
        self._refresh_factors()
        self.frozen = False
        self.ever_restored = [torch.zeros_like(m, dtype=torch.bool) for m in self.M]
        self.restore_events = 0  # weights whose mask went 0 -> 1, cumulative (a weight may count twice)
        self._restored: list[torch.Tensor | None] = [None] * len(self.grids)  # this step's restored groups
        self.controller = LagrangianController(1, config.dual_lr, config.dual_restarts) if self.target_density else None
        self.constraint_target = 1.0
        self.start = self.freeze_at = 0
        self.last_step = -1

    def _initial_m(self, grid) -> torch.Tensor:
        """M of one grid at the start: the constant ``init``, or ranked by magnitude (see the config)."""
        config, device = self.config, grid.members[0].param.device
        if config.init != "magnitude":
            return torch.full(grid.shape, config.init, device=device)
        with torch.no_grad():  # ranks over the whole layer; this process keeps its rows
            scores = grid.gather(grid.score([m.param.detach() for m in grid.weights], "mean")).flatten()
            rank = torch.empty(scores.numel(), device=scores.device)
            rank[torch.argsort(scores.float(), stable=True)] = torch.arange(1, scores.numel() + 1, device=scores.device,
                                                                            dtype=rank.dtype)
            full = (rank * (2.0 * config.init_scale / scores.numel())).view(grid.full_shape)
            return grid.local_rows(full).to(device)

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
        window = StepWindow.resolve(total_steps, None, c.start_fraction, None, c.end_fraction)
        self.start = window.start
        self.target_at_time = CubicSchedule(1.0, self.target_density or 1.0, window)
        self.freeze_at = resolve_step(None, c.freeze_fraction, total_steps)
        fused = sum(g.total_numel for g, f in zip(self.grids, self._fused) if f)  # every rank decides alike
        self.compiled = fused > 0 and gk.use_compiled(total_steps, fused)
        self._follow_device()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.M), "lr": self.config.mask_lr or lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def before_forward(self, step: int) -> None:
        self._follow_device()
        if not self._written:  # after_step left W * h(M) in the targets already: a pass per weight saved
            self.real.write(self._factors)
            self._written = True

    def _ste_arg(self) -> float:
        c = self.config
        return c.leaky_slope if c.ste == "leaky_relu" else c.softplus_beta

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        coef = (self.reg_coef() if step >= self.start else 0.0) / self.numel
        fused, entries = [], []  # one pass per fused grid: M's gradient, the masked W gradient, the real W back
        for i, (g, m) in enumerate(zip(self.grids, self.M)):
            span = self._spans[i]
            if self._fused[i]:
                target, w, keep = g.members[0].target, self.real.values[span[0]], self._factors[span[0]]
                grad, param = target.grad, target.param  # this process's rows
                if grad is not None and grad.is_contiguous():
                    fused.append(i)
                    entries.append({"real": w.view(-1), "grad": grad.view(-1), "param": param.view(-1),
                                    "keep": keep.view(-1)})
                    if not self.frozen:
                        entries[-1]["m"] = m.detach().view(-1)
                    continue
            corr = torch.zeros_like(m)
            for j in span:
                member, f, w = self.covered[j], self._factors[j], self.real.values[j]
                grad = member.target.grad  # this process's rows
                if grad is not None:
                    if not self.frozen and member.scored:
                        corr += member.tiling.reduce(grad.float() * torch.sign(w), "sum")
                    grad.mul_(f)
                member.target.param.copy_(w)  # the real W, for the optimizer
            if self.frozen:
                m.grad = None  # frozen masks: the optimizer skips M
            else:
                reg_g = coef if g.single else coef * g.sizes
                m.grad = ste_grad(m, self.config).mul_(corr.add_(reg_g))
        if self.frozen:
            gk.run_many("ap_frozen_grads", self.compiled, entries)
            for i in fused:
                self.M[i].grad = None  # frozen masks: the optimizer skips M
        elif fused:
            reg = torch.tensor(coef, dtype=torch.float32, device=self.M[fused[0]].device)
            grads = gk.run_many("ap_grads", self.compiled, entries, reg=reg, ste=self.config.ste, arg=self._ste_arg())
            for i, m_grad in zip(fused, grads):
                self.M[i].grad = m_grad.view(self.M[i].shape)
        self._written = False

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        self.last_step = step
        # Take the stepped W where kept; pruned weights had zero gradient, so keep their old values
        # (undoing any move by momentum or weight decay). A fused grid does this, takes its new mask
        # m > 0 and writes W * h(M) for it in one pass.
        kept: list[float | None] = [None] * len(self.grids)  # weights kept by the new masks, where counted
        written: list[torch.Tensor | None] = [None] * len(self.grids)  # the masks the fused grids wrote for
        fused, entries, copies = [], [], []
        for i, (g, m) in enumerate(zip(self.grids, self.M)):
            span = self._spans[i]
            if self._fused[i]:
                target, keep = g.members[0].target, self.masks[i]
                states = [] if self.frozen else [local(st) for st in optimizer_states(optimizer, target.parameter)]
                flat = [st.contiguous() for st in states]  # (Adam's are; a copy otherwise)
                copies += [(st, c) for st, c in zip(states, flat) if c is not st]
                fused.append(i)
                entries.append({"m": m.detach().view(-1), "real": self.real.values[span[0]].view(-1),
                                "param": target.param.view(-1), "keep": keep.view(torch.uint8).view(-1),
                                "ever": self.ever_restored[i].view(torch.uint8).view(-1),
                                "states": [st.view(-1) for st in flat]})
                continue
            for j in span:
                self.real.values[j].lerp_(self.covered[j].target.param, self._factors[j])  # exact for 0/1
        if fused:  # keep now holds m > 0 (unless frozen)
            counts = gk.run_many("ap_step", self.compiled, entries, frozen=self.frozen)
            for st, c in copies:
                st.copy_(c)
            for i, (n, k) in zip(fused, counts):
                self.restore_events += int(n)
                kept[i], written[i] = float(k), self.masks[i]
        if not self.frozen:  # (a fused grid's mask is the one in effect, updated in place)
            self._set_masks([k if k is not None else m.detach() > 0 for k, m in zip(written, self.M)])
            if self.controller is not None and step >= self.start:
                self.constraint_target = self.target_at(step)
                self.controller.step(torch.tensor([self._density(kept) / self.constraint_target - 1.0]))
            if self.total_steps and step + 1 >= self.freeze_at:
                self.freeze()
        self._reset_moments(step, optimizer)
        for i, span in enumerate(self._spans):
            if written[i] is not None and written[i] is self.masks[i]:
                continue  # (a projection at the freeze may have changed the mask since)
            for j in span:
                torch.mul(self.real.values[j], self._factors[j], out=self.covered[j].target.param)
        self._written = True

    def _reset_moments(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Zero the optimizer state of the weights restored at this step; keep the rest off subnormals.

        A restored weight starts afresh (no stale moments); that is the invariant. A pruned weight's
        state is left alone while it is pruned: its gradient is zero and its value is held, so its
        moments only decay, and the W trajectory is the one that zeroing them at every step gave.
        Zeroing them every step cost time twice: the multiply itself, and Adam's ``sqrt`` over zeros,
        slower than over normal floats on CPU (a whole AdamW step over LeNet-300-100's weights at
        density 0.1, one thread: about 1.5 ms against 0.9). Decaying second moments do turn
        subnormal after some 10^4-10^5 steps, and AdamW over subnormal ``v`` took 41 ms against
        0.9 (``bench/bench_denormal.py``); so every ``V_FLOOR_EVERY`` steps ``v`` is raised to at
        least :data:`V_FLOOR`, whose square root (2^-58) vanishes next to Adam's ``eps`` in float32:
        no update changes by it.
        """
        restored, self._restored = self._restored, [None] * len(self.grids)
        if optimizer is None:
            return
        for g, back in zip(self.grids, restored):
            if back is None:
                continue
            for member in g.members:
                f = member.expand(back).to(member.param.dtype)
                for s in optimizer_states(optimizer, member.target.parameter):
                    local(s).mul_(1.0 - f)  # this process's rows
        if step % V_FLOOR_EVERY == 0:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
            for member in self.covered:
                state = inner.state.get(member.target.parameter, {})
                for key in ("exp_avg_sq", "max_exp_avg_sq"):
                    if torch.is_tensor(state.get(key)) and state[key].is_floating_point():
                        local(state[key]).clamp_(min=V_FLOOR)

    def finalize(self) -> None:
        """Meet the target (if training stopped before the final phase) and write ``W * h(M)``."""
        if self.controller is not None and not self.frozen:
            self.freeze()
        self.real.write(self._factors)
        self._written = True

    # -- masks ---------------------------------------------------------------------------------
    def group_masks(self) -> list[torch.Tensor]:
        return [k.clone() for k in self.masks]

    def density(self) -> float:
        """Kept fraction of the targeted weights."""
        return density_of(self.grids, self.masks)

    def _density(self, kept: list[float | None]) -> float:
        """:meth:`density`, with the per-grid kept weights a fused pass counted (None: count them)."""
        here = [k if k is not None else g.weights_behind(mask) for g, mask, k in zip(self.grids, self.masks, kept)]
        if any(g.shard is not None for g in self.grids):
            here = sum_over_ranks(self.grids, here)
        return sum(here) / self.numel

    def target_at(self, step: int) -> float:
        """t(step): cubic from 1 at ``start`` to target_density at ``end`` (Zhu & Gupta's shape)."""
        return self.target_at_time(step + 1)

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
        """Masks holding the largest m over all targets, as close to ``density`` as groups allow.

        Ties are broken deterministically (by position), so every rank makes the same choice.
        """
        keep = keep_top(self.grids, [g.host(m.detach().float()) for g, m in zip(self.grids, self.M)], density, "global")
        return [k.to(m.device) for k, m in zip(keep, self.M)]

    def _set_masks(self, new: list[torch.Tensor]) -> None:
        """Put ``new`` masks in effect, counting the weights that come back (their optimizer state
        is zeroed after the step). A mask that is the one in effect (a fused pass updated it in
        place and did the counting) is left as it is."""
        changed = False
        for g, (old, keep) in enumerate(zip(self.masks, new)):
            if keep is old:
                continue
            changed = True
            back = keep & ~old
            n = self._kept(g, back)
            if n:
                self.restore_events += n
                self.ever_restored[g] |= back
                self._restored[g] = back if self._restored[g] is None else self._restored[g] | back
        if changed:  # (contiguous: the fused passes read a mask as flat uint8; an N:M projection may not be)
            self.masks = [k.contiguous() for k in new]
            self._refresh_factors()

    def _kept(self, g: int, flags: torch.Tensor) -> int:
        """Number of weights behind the True entries of grid ``g``'s ``flags``."""
        return int(self.grids[g].weights_behind(flags))

    def _refresh_factors(self) -> None:
        factors = []
        for g, mask, fused in zip(self.grids, self.masks, self._fused):
            if fused:  # the bool mask viewed as uint8 (see gate_kernels.ap_grads): no float copy
                factors.append(mask.view(torch.uint8))
            else:
                factors.extend(m.expand(mask).to(m.param.dtype) for m in g.members)
        self._factors = factors
        self._written = False  # whether the targets hold W * h(M) for these factors

    def _follow_device(self) -> None:
        """Keep M and W where the model is (it may move after the method was built)."""
        self.real.follow()
        moved = False
        for i, (g, m) in enumerate(zip(self.grids, self.M)):
            dev = g.members[0].param.device
            if m.device != dev:
                moved = True
                m.data = m.data.to(dev)  # same Parameter object: the optimizer keeps tracking it
                g.follow(dev)
                self.masks[i], self.ever_restored[i] = self.masks[i].to(dev), self.ever_restored[i].to(dev)
        if moved:
            self._refresh_factors()

    # -- reporting ---------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        restored = int(kept_weights(self.grids, self.ever_restored))  # over every rank's rows
        restore_events = int(sum_over_ranks(self.grids[:1], [self.restore_events])[0])
        active = not self.frozen and self.last_step >= self.start
        out = {"density": self.density(), "reg_coef": self.reg_coef() if active else 0.0, "restored_weights": restored,
               "restore_events": restore_events, "frozen": float(self.frozen)}
        if self.controller is not None:
            out["constraint_target"] = self.constraint_target
        return out

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"m": [m.detach().clone() for m in self.M], "dense": self.real.state_dict(),
                "frozen": self.frozen, "masks": [k.clone() for k in self.masks],
                "ever_restored": [e.clone() for e in self.ever_restored], "restore_events": self.restore_events,
                "constraint_target": self.constraint_target, "last_step": self.last_step,
                "controller": self.controller.state_dict() if self.controller is not None else {}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.real.load_state_dict(state["dense"])
        for dst, key in ((self.M, "m"), (self.masks, "masks"), (self.ever_restored, "ever_restored")):
            for d, s in zip(dst, state[key], strict=True):
                d.copy_(s)
        self._refresh_factors()
        self.frozen = bool(state["frozen"])
        self.restore_events = int(state["restore_events"])
        self.constraint_target = float(state["constraint_target"])
        self.last_step = int(state["last_step"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
