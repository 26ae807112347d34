"""The interface every sparsity method implements, and the pieces they share.

How a method touches the model (the "effective weight" scheme)
----------------------------------------------------------------
A method never replaces a Parameter or wraps a module. It writes the weight the forward pass
should see (``W * mask``, ``W * z``, ...) *in place* into the target parameter, and, where its
real trainable state differs from that effective weight (DNS keeps the dense ``W``, L0 keeps
``W`` and gate logits), it keeps that state itself and maps gradients by the chain rule after
the backward pass. Because the parameter objects never change, this works identically for
Linear, Conv and the flat weights of ``nn.LSTM``/``nn.GRU``, under DDP, with gradient
accumulation and clipping, and adds no work to the forward pass.

The engine calls, for each optimizer step ``step`` (0-based count of steps already taken):

1. ``before_forward(step)`` - before the first micro-batch: write the training-time weights.
2. forward/backward of every micro-batch (Trainer's own code); ``param.grad`` then holds
   dL/d(effective weight), already averaged over ranks by DDP.
3. ``after_backward(step)`` - turn those into gradients of the method's real parameters.
4. Trainer clips gradients and steps the optimizer.
5. ``after_step(step, optimizer)`` - update masks/schedules and leave the targets holding the
   *evaluation* weights, so evaluation, prediction and checkpoints between steps see them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..grids import UNSTRUCTURED, Granularity, GranularityKinds, GroupGrid, Target, build_grids, refuse_split

logger = logging.getLogger(__name__)


class MethodConfig(BaseModel):
    """Base for each method's ``sparsity.params``; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")


def step_generator(seed: int, step: int, salt: str = "") -> torch.Generator:
    """A CPU generator seeded from (seed, step, salt).

    Every stochastic choice (DNS's surgery draw, Hard Concrete noise) draws from one of these, so
    all ranks make the same choice without communicating, and a resumed run makes the same choices
    as an uninterrupted one without any saved RNG state.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def optimizer_states(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """The per-element state tensors (momentum, Adam moments, ...) the optimizer keeps for ``param``."""
    if optimizer is None:
        return []
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    state = inner.state.get(param, {})
    return [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]


class SparsityMethod:
    """Base class. Subclasses set ``name``/``Config`` and are registered with ``@register_method``.

    A method sees its targets through group grids (:mod:`hf_sparse.grids`): one grid per layer (or
    per target), whose groups are whatever the recipe's granularity makes them, so the same method
    code serves every granularity in ``granularities`` and FSDP2-sharded parameters alike.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: "required", "optional" or "unused": how the method treats ``sparsity.target_density``.
    target_density_mode: ClassVar[str] = "optional"
    #: Values of ``sparsity.granularity`` (kinds) the method implements: every registered one
    #: except the low-rank kinds a method must list itself.
    granularities: ClassVar[GranularityKinds] = GranularityKinds()
    #: Whether Trainer's weight decay may act on the targeted weights.
    weight_decay_on_targets: bool = True
    #: Whether the method follows FSDP2-sharded parameters (see :mod:`hf_sparse.grids.shards`).
    supports_fsdp2: ClassVar[bool] = False

    def __init__(self, targets: list[Target], config: MethodConfig, target_density: float | None, seed: int = 0,
                 granularity: Granularity = UNSTRUCTURED, model: nn.Module | None = None):
        """``model`` (optional) lets channel grids pair with the BatchNorm that follows a layer."""
        self.targets = targets
        self.config = config
        self.granularity = granularity
        self.target_density = granularity.fixed_density or target_density
        self.seed = seed
        self.total_steps = 0
        self.grids = self.build_grids(model)
        # targets no grid covers (coupled groups: a layer that keeps its width) are not the method's
        gridded = {id(m.target.param) for g in self.grids for m in g.weights}
        left = [t.name for t in targets if id(t.param) not in gridded]
        if left:
            logger.info("granularity %s: %d targeted weights belong to no removable channel group and stay "
                        "dense (e.g. %s); see hf-sparse inspect --groups", granularity, len(left), ", ".join(left[:3]))
            self.targets = [t for t in targets if id(t.param) in gridded]
        self.covered = [m for g in self.grids for m in g.members]  # every tensor a grid acts on, in grid order
        #: ``group`` granularity: the coupled channel groups the grids act on (purge and cost models)
        self.channel_groups = [g.channel_group for g in self.grids if g.channel_group is not None]
        if not self.supports_fsdp2:
            refuse_split(self.grids, f"method {self.name!r} does not support FSDP2-sharded parameters yet; "
                                     "use DDP or one of the methods that do")

    def build_grids(self, model: nn.Module | None) -> list[GroupGrid]:
        return build_grids(self.targets, self.granularity, model)

    @classmethod
    def config_error(cls, config: MethodConfig, target_density: float | None) -> tuple[tuple[str, ...], str] | None:
        """Cross-checks of params against target_density: (key below ``sparsity``, message) or None."""
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, total_steps: int) -> None:
        """Called once when training starts (also on resume), with Trainer's ``max_steps``."""
        self.total_steps = total_steps

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Extra trainable tensors (gates, auxiliary masks) for Trainer's optimizer, as param groups."""
        return []

    def before_forward(self, step: int) -> None:
        """Write the weights the training forward pass of this step uses."""

    def after_backward(self, step: int) -> None:
        """Map dL/d(effective weight) in ``param.grad`` to the method's real parameters."""

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Update masks and schedules; leave the evaluation weights in the targets."""

    def finalize(self) -> None:
        """Write the final hard-masked weights; afterwards the model needs no hf_sparse code."""
        with torch.no_grad():
            for t, m in zip(self.targets, self.hard_masks()):
                t.param.mul_(m)

    def mask_factors(self, masks: list[torch.Tensor], compact: bool = False) -> list[torch.Tensor]:
        """Per-grid boolean masks as multipliers of every covered tensor (``covered`` order).

        For units the factor is a broadcast view of one float per unit. A factor as large as its
        tensor (single weights, blocks) is a float 0/1 copy (4 bytes per weight), or with
        ``compact`` the boolean mask viewed as ``uint8``: no copy at all for single weights, 1 byte
        per weight for blocks. Both give bit-identical products; measured per multiply on one
        thread, float 0.65 ms, uint8 1.07 ms, bool 1.9 ms, ``masked_fill_`` 8.4 ms (2.4M weights,
        half of them pruned at random).
        """
        out = []
        for g, mask in zip(self.grids, masks):
            for m in g.members:
                factor = m.expand(mask)
                if compact and factor.numel() >= m.param.numel():
                    out.append(factor.view(torch.uint8))
                else:
                    out.append(factor.to(m.param.dtype))
        return out

    # -- reporting ---------------------------------------------------------------------------
    def group_masks(self) -> list[torch.Tensor]:
        """Boolean keep-masks, one per grid (group-shaped), as the weights would be exported now."""
        return [g.reduce([(m.param.detach() != 0).float() for m in g.weights], "max") > 0 for g in self.grids]

    def hard_masks(self) -> list[torch.Tensor]:
        """Boolean keep-masks, one per target (full shape)."""
        full = {}
        for g, keep in zip(self.grids, self.group_masks()):
            for m in g.weights:
                full[id(m.target.param)] = m.full(keep)
        # a target outside every grid (group granularity: a layer that keeps its width) stays dense
        return [full[id(t.param)] if id(t.param) in full else torch.ones_like(t.param, dtype=torch.bool)
                for t in self.targets]

    @property
    def target_unit(self) -> str:
        """What ``target_density`` counts: ``"weights"``, or ``"gates"`` for a method that sets it in
        units/channels (the card and the summary then compare like with like)."""
        return "weights"

    def metrics(self) -> dict[str, float]:
        """Method-specific numbers for Trainer's logs (thresholds, counts, multipliers...)."""
        return {}

    def structure(self) -> dict[str, list[int]] | None:
        """Structured granularity: target name -> indices of surviving output units/channels (of the
        whole layer)."""
        if not self.granularity.structured:
            return None
        return {m.target.name: torch.nonzero(g.gather(keep)).flatten().tolist()
                for g, keep in zip(self.grids, self.group_masks()) for m in g.weights}

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskedMethod(SparsityMethod):
    """A method whose state is one boolean mask per grid (DNS, GMP, Narang).

    The mask of a grid covers its weights and their companions (unit biases, BatchNorm affine
    parameters at channel granularity), so a pruned unit emits exactly zero. Memory: the mask
    itself, 1 byte per group (per weight when unstructured), and for blocks one full-size byte
    mask to multiply with; no float copy.
    """

    def __init__(self, targets, config, target_density, seed=0, granularity=UNSTRUCTURED, model=None):
        super().__init__(targets, config, target_density, seed, granularity, model)
        self.masks = [torch.ones(g.shape, dtype=torch.bool, device=g.members[0].param.device) for g in self.grids]
        self._factors: list[torch.Tensor] = []
        self.masks_changed()

    def masks_changed(self) -> None:
        """Refresh the multipliers after the masks changed (compact: see :meth:`mask_factors`)."""
        self._factors = self.mask_factors(self.masks, compact=True)

    def group_masks(self) -> list[torch.Tensor]:
        return [m.clone() for m in self.masks]

    def group_scores(self, how: str, values: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-grid group scores of ``values`` (default: the weights the targets hold now)."""
        if values is None:
            return [g.score([m.param.detach() for m in g.weights], how) for g in self.grids]
        by_param = dict(zip((id(m.target.param) for m in self.covered), values))
        return [g.score([by_param[id(m.target.param)] for m in g.weights], how) for g in self.grids]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights, before Trainer clips them.

        Without this, a 10%-dense model's gradient norm is mostly made of pruned positions and
        clipping shrinks the updates of the weights that are actually kept.
        """
        for m, f in zip(self.covered, self._factors):
            grad = m.target.grad  # this process's rows of the gradient
            if grad is not None:
                grad.mul_(f)

    @torch.no_grad()
    def zero_masked(self) -> None:
        """Hold pruned weights at exactly zero: called after every optimizer step.

        Re-zeroing after each step is what stops momentum, Adam's moments and weight decay from
        reviving a pruned weight, whatever the optimizer. The optimizer state of pruned weights is
        deliberately not zeroed: with masked gradients it decays on its own, whereas state set to
        exactly zero puts Adam's ``sqrt`` on zeros, which runs ~5x slower than on normal floats on
        CPU (measured; it made a whole gmp training step ~25% slower than dense).
        """
        for m, f in zip(self.covered, self._factors):
            m.param.mul_(f)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, saved in zip(self.masks, state["masks"], strict=True):
            m.copy_(saved)
        self.masks_changed()
