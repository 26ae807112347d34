"""``l0``: Hard Concrete L0 gates, controlled by a penalty, a constraint or an augmented Lagrangian.

Each gate multiplies a weight (``unstructured``), an output unit (``channel``/``neuron``: a conv
output channel, a Linear output unit, or a recurrent hidden unit, whose gate covers its rows in
every gate block of both ``weight_ih`` and ``weight_hh``), or a rank-1 component of a factorised
Linear ``W = P diag(z) Q`` (``factorized``, Wang et al. 2020; P and Q from an SVD of W).

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

"Density" counts weights (``count: weights``, a gate costs the weights it controls; a factorised
component costs ``out + in``) or gates (``count: gates``: fraction of units/channels/components).

The effective-weight scheme (see ``base.py``), and why weight decay and Adam act on the real W
-------------------------------------------------------------------------------------------------
The method keeps the real dense weights ``W`` (and ``P``, ``Q`` when factorised). Per step:

* ``before_forward``: draw one noise sample per gate (``step_generator``: same on every rank,
  same after a resume) and write ``W * z`` into the target.
* ``after_backward``: ``param.grad`` holds ``g = dL/d(W z)``. The gate gradient comes from
  autograd through a small graph ``sum(z(log_alpha, u) * W * g) + regulariser(log_alpha)``;
  then the target is set back to the real ``W`` with gradient ``g * z``. So Trainer's optimizer
  steps the *real* weights: AdamW's decoupled weight decay shrinks ``W`` (not ``W z``), and Adam's
  moments see the masked gradients ``g z`` (a closed gate gives a zero gradient; its moments decay
  and the weight keeps its value, so a gate can reopen onto a trained weight).
* ``after_step``: clamp ``log_alpha``, take the dual step, store the updated ``W`` and leave the
  evaluation weights ``W * z_eval`` in the target.

Hard masks that meet the target
-------------------------------
The expected density is what the constraint controls; the exported model needs hard 0/1 gates.
Gates that have not polarised make the two differ. So for the last ``freeze_fraction`` of
training the gates are *frozen* to a hard mask and only the weights train (adapting to it). The
mask keeps, in each gated layer, the ``k`` gates with the largest ``log_alpha``. Under ``penalty``,
``k = round(E[L0])`` (Wang et al.'s rule). Under ``constrained``/``augmented`` the mask spends
exactly the target budget: per layer (``constraint: layer``), or split over the layers in
proportion to their ``E[L0]`` (``model``), so the hard mask is consistent with the constraint
whether it was still slightly violated or held with slack when the gates froze. Before the freeze,
evaluation uses the deterministic (median) gate of :mod:`.hard_concrete`; after it (and in the
exported model), the binary mask.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from . import hard_concrete as hc
from . import register_method
from .base import MethodConfig, SparsityMethod, step_generator
from .constraints import AugmentedLagrangianController, LagrangianController
from .targets import Target

_RECURRENT = re.compile(r"^weight_(?:ih|hh)_(l\d+(?:_reverse)?)$")


class L0Config(MethodConfig):
    control: Literal["penalty", "constrained", "augmented"] = Field(
        "constrained", description="penalty: loss + penalty*E[L0]/N; constrained: E[density] <= target by dual "
                                   "ascent; augmented: Wang et al.'s lambda1*(s-t) + lambda2*(s-t)^2")
    granularity: Literal["unstructured", "channel", "neuron", "factorized"] = Field(
        "unstructured", description="a gate per weight; per output channel/unit/hidden unit (channel and neuron "
                                    "are the same); or per rank-1 component of W = P diag(z) Q (2-D weights)")
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
    temperature: float = Field(hc.BETA, gt=0, le=1, description="Hard Concrete temperature beta")
    target_warmup: float = Field(0.0, ge=0, le=1, description="constrained/augmented: fraction of training over which "
                                                              "the target ramps linearly from density 1")
    freeze_fraction: float = Field(0.1, ge=0, lt=1, description="final fraction of training with the gates frozen "
                                                                "to the hard mask while the weights adapt")
    batchnorm: bool = Field(True, description="channel gates: where a BatchNorm follows the gated layer, gate the "
                                              "BatchNorm's affine output instead (it would undo a gate in front of it)")

    @model_validator(mode="after")
    def _warmup_before_freeze(self):
        if self.target_warmup + self.freeze_fraction > 1:
            raise ValueError("target_warmup + freeze_fraction must be <= 1: the target must be reached "
                             "before the gates freeze")
        return self


@dataclass
class _Gated:
    """One tensor a gate acts on - a target weight, its unit's bias, a BatchNorm's weight or bias."""

    param: nn.Parameter
    real: torch.Tensor  # the trained value; between hooks the parameter holds W*z or the evaluation value
    scaled: bool = True  # False: trains ungated (its gate acts after a BatchNorm), zeroed with its unit at eval


@dataclass
class _Member:
    """One target under a gate group: its weight first, then (unit gates) its units' other tensors."""

    target: Target
    tensors: list[_Gated]  # empty when factorised (P, Q are the real parameters)
    blocks: int = 1  # recurrent gate blocks (3 for GRU, 4 for LSTM): a unit's gate repeats per block
    norm: nn.Module | None = None  # the BatchNorm the gate acts after, if any

    @property
    def weight(self) -> torch.Tensor | None:
        return self.tensors[0].real if self.tensors else None

    def expand(self, z: torch.Tensor, structured: bool, ndim: int | None = None) -> torch.Tensor:
        """The gate tensor broadcast to a tensor of this member (the weight unless ``ndim`` says)."""
        if not structured:
            return z
        ndim = self.target.param.dim() if ndim is None else ndim
        return z.repeat(self.blocks).view(-1, *([1] * (ndim - 1)))

    def reduce(self, t: torch.Tensor, structured: bool) -> torch.Tensor:
        """Adjoint of :meth:`expand`: sum a tensor of this member onto the gates."""
        if not structured:
            return t
        return t.reshape(t.shape[0], -1).sum(1).view(self.blocks, -1).sum(0)


@dataclass
class _Gates:
    """The gates of one layer: their logits, the targets they control and what each costs."""

    name: str
    log_alpha: nn.Parameter
    members: list[_Member]
    cost: float  # density units per gate
    total: float  # density units of the whole group
    P: nn.Parameter | None = None
    Q: nn.Parameter | None = None
    noise: torch.Tensor | None = field(default=None, repr=False)  # this step's logistic noise
    z: torch.Tensor | None = field(default=None, repr=False)  # this step's gate values
    slope: torch.Tensor | None = field(default=None, repr=False)  # dz/dlog_alpha at this step

    @property
    def num(self) -> int:
        return self.log_alpha.numel()


@register_method
class L0(SparsityMethod):
    """Hard Concrete L0 gates (Louizos 2018) with penalty, constrained or augmented-Lagrangian control."""

    name = "l0"
    Config = L0Config
    target_density_mode = "optional"

    @classmethod
    def needs_target(cls, config: L0Config) -> bool:
        """Only ``penalty`` control runs without a target density."""
        return config.control != "penalty"

    @classmethod
    def config_error(cls, config: L0Config, target_density: float | None) -> tuple[tuple[str, ...], str] | None:
        if target_density is None and cls.needs_target(config):
            return ("target_density",), f"l0 with control {config.control!r} needs a target_density in (0, 1]"
        return None

    def __init__(self, targets: list[Target], config: L0Config, target_density: float | None, seed: int = 0):
        super().__init__(targets, config, target_density, seed)
        cfg = self.config = config
        if self.needs_target(cfg) and target_density is None:
            raise ValueError(f"l0 with control {cfg.control!r} needs sparsity.target_density")
        self.structured = cfg.granularity in ("channel", "neuron")
        self.factorized = cfg.granularity == "factorized"
        self.groups = self._build_groups(targets)
        n = len(self.groups) if cfg.constraint == "layer" else 1
        self.controller: LagrangianController | AugmentedLagrangianController | None = None
        if cfg.control == "constrained":
            self.controller = LagrangianController(n, cfg.dual_lr, cfg.dual_restarts)
        elif cfg.control == "augmented":
            self.controller = AugmentedLagrangianController(n, cfg.dual_lr)
        self.frozen = False
        self.keep: list[torch.Tensor] | None = None
        self.freeze_step = 0
        self.warmup_steps = 0
        self._violation: torch.Tensor | None = None
        self._la_before: list[torch.Tensor] | None = None
        self._holds = "real"  # what the targets hold now: "real" W, "train" W*z or "eval" W*z_eval

    # -- construction --------------------------------------------------------------------------
    def _build_groups(self, targets: list[Target]) -> list[_Gates]:
        cfg = self.config
        gen = step_generator(self.seed, 0, "l0-init")
        # Structured recurrent weights: weight_ih_lK and weight_hh_lK share their hidden units' gates.
        clusters: dict[Any, list[Target]] = {}
        for t in targets:
            m = _RECURRENT.match(t.attr)
            key = (id(t.module), m.group(1)) if (self.structured and t.is_recurrent and m) else (id(t), None)
            clusters.setdefault(key, []).append(t)
        groups = []
        for members in clusters.values():
            first = members[0]
            if self.factorized:
                groups.append(self._factorized_group(first, gen))
                continue
            if self.structured:
                units = first.module.hidden_size if first.is_recurrent else first.shape[0]
                shape: tuple[int, ...] = (units,)
                blocks = [t.shape[0] // units for t in members]
            else:
                shape, blocks = tuple(first.shape), [1]
            mem = []
            for t, b in zip(members, blocks):
                # a unit gate removes the whole unit: its bias too, else the unit would still emit it
                params = [t.param] + ([bias] if self.structured and (bias := _unit_bias(t)) is not None else [])
                mem.append(_Member(t, [_Gated(q, q.detach().clone()) for q in params], b))
            numel = sum(t.numel() for t in members)
            num = math.prod(shape)
            la = nn.Parameter(hc.init_log_alpha(shape, cfg.init_drop_rate, gen).to(first.param.device))
            cost, total = (1.0, float(num)) if cfg.count == "gates" else (numel / num, float(numel))
            groups.append(_Gates(first.name, la, mem, cost, total))
        return groups

    def _factorized_group(self, t: Target, gen: torch.Generator) -> _Gates:
        if t.param.dim() != 2:
            raise ValueError(f"factorized gates need 2-D weights; {t.name} has shape {tuple(t.shape)}")
        with torch.no_grad():
            w = t.param.detach().float()
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            root = S.sqrt()
            P = nn.Parameter((U * root).to(t.param.dtype))
            Q = nn.Parameter((root[:, None] * Vh).to(t.param.dtype))
        r = S.numel()
        out, inp = t.shape
        la = nn.Parameter(hc.init_log_alpha((r,), self.config.init_drop_rate, gen).to(t.param.device))
        cost, total = (1.0, float(r)) if self.config.count == "gates" else (float(out + inp), float(out * inp))
        return _Gates(t.name, la, [_Member(t, [])], cost, total, P, Q)

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        self.freeze_step = total_steps - round(self.config.freeze_fraction * total_steps)
        self.warmup_steps = round(self.config.target_warmup * total_steps)
        with torch.no_grad():  # follow the model if it moved after the method was built
            for g in self.groups:
                dev = g.members[0].target.param.device
                for p in (g.log_alpha, g.P, g.Q):
                    if p is not None and p.device != dev:
                        p.data = p.data.to(dev)
                for m in g.members:
                    for t in m.tensors:
                        if t.real.device != t.param.device:
                            t.real = t.real.to(t.param.device)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        groups = [{"params": [g.log_alpha for g in self.groups], "lr": self.config.gate_lr, "weight_decay": 0.0}]
        if self.factorized:
            groups.append({"params": [p for g in self.groups for p in (g.P, g.Q)], "lr": lr, "weight_decay": 0.0})
        return groups

    def attach(self, model: nn.Module) -> None:
        """Pair channel gates with the BatchNorm that normalises the gated layer's output.

        A gate in front of a BatchNorm has no effect in training (``BN(z x) = BN(x)`` for
        ``z > 0``), so the loss could not tell the gates apart. Where a layer's parent registers an
        affine BatchNorm of matching width after it (before any other Conv/Linear) - the
        timm/torchvision convention - the gate multiplies that BatchNorm's weight and bias instead
        (the gate then acts after the normalisation) and the layer trains ungated; the evaluation
        and final weights zero the pruned output channels of the layer itself, too. Call once,
        right after construction (before ``load_state_dict``); a no-op unless ``granularity`` is
        channel/neuron.
        """
        if not (self.structured and self.config.batchnorm):
            return
        modules = dict(model.named_modules())
        for g in self.groups:
            for m in g.members:
                norm = None if m.norm is not None or m.target.is_recurrent else _following_batchnorm(modules, m.target)
                if norm is not None:
                    m.norm = norm
                    for t in m.tensors:
                        t.scaled = False
                    m.tensors += [_Gated(q, q.detach().clone()) for q in (norm.weight, norm.bias)]

    def before_forward(self, step: int) -> None:
        gen = None if self.frozen else step_generator(self.seed, step, "l0")
        for i, g in enumerate(self.groups):
            if self.frozen:
                g.z, g.slope = self.keep[i].to(torch.float32), None
            else:
                g.noise = hc.logistic_noise(hc.sample_uniform(g.log_alpha.shape, gen)).to(g.log_alpha.device)
                g.z, g.slope = hc.sample_and_slope(g.log_alpha, g.noise, self.config.temperature)
        self._write([g.z for g in self.groups], train=True)
        self._holds = "train"

    def after_backward(self, step: int) -> None:
        if self._holds != "train":
            return
        dz = []  # dL/dz per group: the chain rule through W * z (or P diag(z) Q)
        with torch.no_grad():
            for g in self.groups:
                if self.factorized:
                    dz.append(self._factorized_backward(g))
                    continue
                total = torch.zeros_like(g.z)
                for m in g.members:
                    for t in m.tensors:
                        grad = t.param.grad
                        if t.scaled and grad is not None:
                            total += m.reduce(t.real.float() * grad.float(), self.structured)
                            grad.mul_(m.expand(g.z, self.structured, grad.dim()).to(grad.dtype))
                        t.param.data.copy_(t.real)
                dz.append(total)
        self._holds = "real"
        if self.frozen:
            for g in self.groups:
                g.log_alpha.grad = None  # Trainer zeroes only the model's grads: no stale gate updates
            return
        reg_grads = self._regulariser_gradients(step)
        for g, d, r in zip(self.groups, dz, reg_grads):
            g.log_alpha.grad = d * g.slope + r
        if self.config.gate_lr_schedule == "constant":
            self._la_before = [g.log_alpha.detach().clone() for g in self.groups]

    def _factorized_backward(self, g: _Gates) -> torch.Tensor:
        """dL/dP = g Q^T diag(z), dL/dQ = diag(z) P^T g, dL/dz_k = (P^T g Q^T)_kk; W itself does not train."""
        p = g.members[0].target.param
        if p.grad is None:
            g.P.grad, g.Q.grad = torch.zeros_like(g.P), torch.zeros_like(g.Q)
            return torch.zeros_like(g.z)
        gf, P, Q, z = p.grad.float(), g.P.float(), g.Q.float(), g.z
        Pg = P.T @ gf  # (r, in)
        g.P.grad = ((gf @ Q.T) * z).to(g.P.dtype)
        g.Q.grad = (z[:, None] * Pg).to(g.Q.dtype)
        p.grad = None  # the optimizer must not step the effective weight
        return (Pg * Q).sum(1)

    def _regulariser_gradients(self, step: int) -> list[torch.Tensor]:
        """Autograd on the penalty / Lagrangian term of ``log_alpha``; keeps the constraint values."""
        las = [g.log_alpha for g in self.groups]
        with torch.enable_grad():
            reg, self._violation = self._regulariser(step)
            grads = torch.autograd.grad(reg, las, allow_unused=True)
        return [torch.zeros_like(la) if gr is None else gr for la, gr in zip(las, grads)]

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        with torch.no_grad():
            if self._holds == "real":
                for g in self.groups:
                    for m in g.members:
                        for t in m.tensors:
                            t.real.copy_(t.param.data)
            if not self.frozen:
                self._unschedule_gate_step(optimizer)
                for g in self.groups:
                    hc.clamp_(g.log_alpha)
                if self.controller is not None and self._violation is not None:
                    self.controller.step(self._violation)
                self._violation = None
                if step + 1 >= self.freeze_step:
                    self._freeze()
        self._write_eval()

    def _unschedule_gate_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Rescale the gates' last update from the scheduled lr to ``gate_lr``.

        Trainer's LR scheduler scales every param group, the gates' too; with a decaying schedule
        the gates would stop following the constraint long before they freeze. The update of
        SGD/Adam/AdamW without weight decay (the gates have none) is linear in the lr, so
        ``before + gate_lr / lr * (after - before)`` is exactly the step taken at ``gate_lr``.
        """
        before, self._la_before = self._la_before, None
        if before is None or optimizer is None:
            return
        first = self.groups[0].log_alpha
        group = next((pg for pg in optimizer.param_groups if any(p is first for p in pg["params"])), None)
        lr = None if group is None else group.get("lr")
        if not isinstance(lr, (int, float)) or lr <= 0 or lr == self.config.gate_lr:
            return  # not found, an lr-free optimizer, a zero-lr warm-up step, or nothing to undo
        scale = self.config.gate_lr / lr
        for g, b in zip(self.groups, before):
            g.log_alpha.copy_(b + scale * (g.log_alpha - b))

    def finalize(self) -> None:
        if not self.frozen:
            self._freeze()
        self._write_eval()
        if self.factorized:
            with torch.no_grad():  # a component the mask drops is exactly zero
                for g, k in zip(self.groups, self.keep):
                    g.P.mul_(k.to(g.P.dtype))
                    g.Q.mul_(k.to(g.Q.dtype)[:, None])

    # -- the regulariser -------------------------------------------------------------------------
    def _target(self, step: int) -> float:
        """Target density at ``step``: linear from 1 during warm-up, then the recipe's target."""
        t = float(self.target_density)
        if self.warmup_steps <= 0 or step + 1 >= self.warmup_steps:
            return t
        return 1.0 - (1.0 - t) * (step + 1) / self.warmup_steps

    def _expected(self) -> list[torch.Tensor]:
        """Expected density units per group (differentiable in log_alpha)."""
        return [g.cost * hc.expected_l0(g.log_alpha, self.config.temperature) for g in self.groups]

    def _regulariser(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(term added to the loss, constraint values measured now for the dual step)."""
        cfg = self.config
        expected = self._expected()
        totals = torch.tensor([g.total for g in self.groups], device=expected[0].device)
        if cfg.control == "penalty":
            return cfg.penalty * torch.stack(expected).sum() / totals.sum(), None
        if cfg.constraint == "model":
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
        """Fix each group's hard mask: its top-k gates by log_alpha, k from :meth:`hard_counts`."""
        self.keep = []
        for g, k in zip(self.groups, self.hard_counts()):
            order = torch.argsort(g.log_alpha.detach().flatten(), descending=True, stable=True)
            keep = torch.zeros(g.num, dtype=torch.bool, device=g.log_alpha.device)
            keep[order[:k]] = True
            self.keep.append(keep.view(g.log_alpha.shape))
        self.frozen = True

    @torch.no_grad()
    def hard_counts(self) -> list[int]:
        """How many gates each group keeps in the hard mask.

        ``penalty``: ``round(E[L0])`` per group (Wang et al.'s rule). ``constrained``/``augmented``:
        the hard mask spends exactly the target budget - per layer for ``constraint: layer``; for
        ``model``, split over the layers in proportion to their ``E[L0]``, which keeps the allocation
        the gates learnt. A constraint that holds with slack (the loss no longer asks for more
        weights) thus still yields the density the user asked for, and one that is still violated
        when the gates freeze yields a mask that satisfies it.
        """
        cfg = self.config
        expected = [float(hc.expected_l0(g.log_alpha, cfg.temperature)) for g in self.groups]
        if cfg.control == "penalty":
            return [min(g.num, round(e)) for g, e in zip(self.groups, expected)]
        t = float(self.target_density)
        if cfg.constraint == "layer":
            return [_spend([g], [1.0], t * g.total)[0] for g in self.groups]
        return _spend(self.groups, expected, t * sum(g.total for g in self.groups))

    def _eval_gates(self) -> list[torch.Tensor]:
        if self.frozen:
            return [k.to(torch.float32) for k in self.keep]
        return [hc.deterministic(g.log_alpha.detach(), self.config.temperature) for g in self.groups]

    def _write(self, gates: list[torch.Tensor], train: bool = False) -> None:
        """Write ``W * z`` (or ``P diag(z) Q``) into every target, one gate tensor per group.

        A layer paired with a BatchNorm trains ungated (the gate scales the BatchNorm's weight and
        bias); for evaluation its closed channels are zeroed as well.
        """
        with torch.no_grad():
            for g, z in zip(self.groups, gates):
                for m in g.members:
                    if self.factorized:
                        p = m.target.param
                        p.data.copy_(((g.P.float() * z) @ g.Q.float()).to(p.dtype))
                    for t in m.tensors:
                        if t.scaled:
                            t.param.data.copy_(t.real * m.expand(z, self.structured, t.real.dim()).to(t.real.dtype))
                        elif train:
                            t.param.data.copy_(t.real)
                        else:
                            t.param.data.copy_(t.real * m.expand((z > 0).to(t.real.dtype), True, t.real.dim()))

    def _write_eval(self) -> None:
        self._write(self._eval_gates())
        self._holds = "eval"

    def _open(self) -> list[torch.Tensor]:
        """Boolean open gates as they would be exported now."""
        return [z > 0 for z in self._eval_gates()]

    def hard_masks(self) -> list[torch.Tensor]:
        masks: dict[int, torch.Tensor] = {}
        for g, open_ in zip(self.groups, self._open()):
            for m in g.members:
                p = m.target.param
                if self.factorized:
                    masks[id(m.target)] = p.detach() != 0
                else:
                    masks[id(m.target)] = m.expand(open_, self.structured).expand(p.shape).clone()
        return [masks[id(t)] for t in self.targets]

    def structure(self) -> dict[str, list[int]] | None:
        if not self.structured:
            return None
        return {m.target.name: torch.nonzero(open_).flatten().tolist()
                for g, open_ in zip(self.groups, self._open()) for m in g.members}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factorised granularity: ``name -> (P', Q')`` with only the open components, ``W = P' Q'``."""
        out = {}
        for g, z in zip(self.groups, self._eval_gates()):
            k = z > 0
            out[g.name] = ((g.P.detach() * z)[:, k], g.Q.detach()[k])
        return out

    # -- reporting -----------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        cfg = self.config
        total = sum(g.total for g in self.groups)
        out = {
            "expected_density": float(sum(self._expected())) / total,
            "hard_density": sum(float(o.sum()) * g.cost for g, o in zip(self.groups, self._open())) / total,
            "frozen": float(self.frozen),
        }
        if cfg.control == "penalty":
            out["penalty"] = cfg.penalty
            return out
        step = max(self.controller.steps - 1, 0)
        out["target_density"] = self._target(step)
        expected = torch.stack(self._expected()).double()
        totals = torch.tensor([g.total for g in self.groups], dtype=torch.float64)
        density = (expected.sum() / totals.sum()).reshape(1) if cfg.constraint == "model" else expected / totals
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
            "log_alpha": [g.log_alpha.detach().clone() for g in self.groups],
            "tensors": [[[t.real.clone() for t in m.tensors] for m in g.members] for g in self.groups],
            "P": [None if g.P is None else g.P.detach().clone() for g in self.groups],
            "Q": [None if g.Q is None else g.Q.detach().clone() for g in self.groups],
            "frozen": self.frozen,
            "keep": None if self.keep is None else [k.clone() for k in self.keep],
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["log_alpha"]) != len(self.groups):
            raise ValueError(f"l0 state has {len(state['log_alpha'])} gate groups, the model has {len(self.groups)}")
        with torch.no_grad():  # copy into the existing tensors: the optimizer holds references to them
            for i, g in enumerate(self.groups):
                g.log_alpha.copy_(state["log_alpha"][i])
                for m, saved in zip(g.members, state["tensors"][i]):
                    if len(saved) != len(m.tensors):
                        raise ValueError(f"l0 state holds {len(saved)} gated tensors for {m.target.name}, the model "
                                         f"{len(m.tensors)}: was attach(model) called in one run and not the other?")
                    for t, value in zip(m.tensors, saved):
                        t.real.copy_(value)
                for p, saved in ((g.P, state["P"][i]), (g.Q, state["Q"][i])):
                    if p is not None:
                        p.copy_(saved)
        self.frozen = bool(state["frozen"])
        self.keep = None if state["keep"] is None else [
            k.to(g.log_alpha.device) for k, g in zip(state["keep"], self.groups)]
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self._violation = None
        self._holds = "eval"


def _spend(groups: list[_Gates], weights: list[float], budget: float) -> list[int]:
    """Gate counts per group, proportional to ``weights``, whose cost fills ``budget`` (never over).

    Groups that would exceed their size are capped and the rest of the budget is shared among the
    others; fractional counts are floored and the leftover goes by largest remainder.
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
    for i in sorted(range(len(groups)), key=lambda i: counts[i] - ints[i], reverse=True):
        if ints[i] < groups[i].num and spent + groups[i].cost <= budget + 1e-6:
            ints[i] += 1
            spent += groups[i].cost
    return ints


def _following_batchnorm(modules: dict[str, nn.Module], target: Target) -> nn.Module | None:
    """The affine BatchNorm registered after ``target``'s layer in the same parent, if nothing with
    weights (a Conv/Linear) comes between them and its width matches the layer's output channels."""
    path = target.name.rpartition(".")[0]
    if not path:
        return None
    parent_name, _, child = path.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or child not in parent._modules:
        return None
    names = list(parent._modules)
    for name in names[names.index(child) + 1:]:
        sub = parent._modules[name]
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            ok = sub.affine and sub.num_features == target.shape[0]
            return sub if ok else None
        if sub is not None and any(isinstance(x, (nn.Linear, nn.modules.conv._ConvNd)) for x in sub.modules()):
            return None
    return None


def _unit_bias(t: Target) -> nn.Parameter | None:
    """The bias of the units whose weight rows ``t`` holds (``bias``, ``bias_ih_l0``, ...), if any."""
    bias = getattr(t.module, t.attr.replace("weight", "bias", 1), None)
    return bias if isinstance(bias, nn.Parameter) and bias.dim() == 1 and bias.shape[0] == t.shape[0] else None
