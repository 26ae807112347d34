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
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .targets import Target


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
    """Base class. Subclasses set ``name``/``Config`` and are registered with ``@register_method``."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: "required", "optional" or "unused": how the method treats ``sparsity.target_density``.
    target_density_mode: ClassVar[str] = "optional"

    def __init__(self, targets: list[Target], config: MethodConfig, target_density: float | None, seed: int = 0):
        self.targets = targets
        self.config = config
        self.target_density = target_density
        self.seed = seed
        self.total_steps = 0

    def attach(self, model: nn.Module) -> None:
        """Called once with the whole model right after construction, for methods that need more
        than their targets (e.g. L0 channel gates pairing with a following BatchNorm)."""

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

    # -- reporting ---------------------------------------------------------------------------
    def hard_masks(self) -> list[torch.Tensor]:
        """Boolean keep-masks, one per target, as the weights would be exported now."""
        return [t.param.detach() != 0 for t in self.targets]

    def metrics(self) -> dict[str, float]:
        """Method-specific numbers for Trainer's logs (thresholds, counts, multipliers...)."""
        return {}

    def structure(self) -> dict[str, list[int]] | None:
        """For structured methods: target name -> indices of surviving output units/channels."""
        return None

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskedMethod(SparsityMethod):
    """A method whose whole state is one boolean keep-mask per target (DNS, GMP, Narang)."""

    def __init__(self, targets, config, target_density, seed=0):
        super().__init__(targets, config, target_density, seed)
        self.masks = [torch.ones_like(t.param, dtype=torch.bool) for t in targets]
        self.keep = [torch.ones_like(t.param) for t in targets]

    def masks_changed(self) -> None:
        """Refresh the float copies of the masks (multiplying by a float mask is ~4x faster than by a bool one)."""
        for k, m in zip(self.keep, self.masks):
            k.copy_(m)

    def hard_masks(self) -> list[torch.Tensor]:
        return [m.clone() for m in self.masks]

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights, before Trainer clips them.

        Without this, a 10%-dense model's gradient norm is mostly made of pruned positions and
        clipping shrinks the updates of the weights that are actually kept.
        """
        for t, k in zip(self.targets, self.keep):
            if t.param.grad is not None:
                t.param.grad.mul_(k)

    @torch.no_grad()
    def zero_masked(self) -> None:
        """Hold pruned weights at exactly zero: called after every optimizer step.

        Re-zeroing after each step is what stops momentum, Adam's moments and weight decay from
        reviving a pruned weight, whatever the optimizer. The optimizer state of pruned weights is
        deliberately not zeroed: with masked gradients it decays on its own, whereas state set to
        exactly zero puts Adam's ``sqrt`` on zeros, which runs ~5x slower than on normal floats on
        CPU (measured; it made a whole gmp training step ~25% slower than dense).
        """
        for t, k in zip(self.targets, self.keep):
            t.param.mul_(k)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, saved in zip(self.masks, state["masks"]):
            m.copy_(saved)
        self.masks_changed()
