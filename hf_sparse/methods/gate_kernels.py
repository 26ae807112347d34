"""Fused per-step arithmetic of unstructured Hard Concrete gates (one gate per weight).

L0 training touches every gate three times per step: the sample and the effective weight
``W * z`` before the forward, the gradients after backward, and the evaluation weight after the
optimizer step. Written as separate torch ops that is a dozen passes over the
weights; here each of the three is one function of flat tensors, which ``torch.compile`` turns into
one loop per tensor on CPU (inductor's C++ backend, vectorised) and on CUDA (Triton).

The noise is the counter-based :func:`~.hard_concrete.hashed_uniform` (integer arithmetic only), so
a compiled kernel computes exactly the bits the eager code computes, draws it inline without a
generator, and needs no stored noise: after backward the sample and its slope are recomputed
from the logits and the step's key rather than kept (8 bytes per gate saved).

Every function runs eagerly too (same formulas; results agree to float32 rounding, about 1e-7
relative, with the compiled ones). :func:`mode` picks: ``eager``, ``compiled``, or ``auto`` (the
default, ``HF_SPARSE_GATE_KERNELS`` overrides it): compiled when a run is long enough to repay the
compilation (a one-time ~10-30 s on CPU), i.e. when ``steps * gates >= AUTO_MIN_WORK``. Short runs
and the tests stay eager; a compiler failure falls back to eager with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from . import hard_concrete as hc

logger = logging.getLogger(__name__)

#: ``auto`` compiles when the run's gate-steps (steps x gates) reach this: LeNet-300-100 (266k gates)
#: from about 4000 steps on (its 10-epoch recipe: 4690). Below it the compilation costs more than
#: the run saves.
AUTO_MIN_WORK = 2**30
_MODES = ("auto", "eager", "compiled")
_mode_override: str | None = None
_compiled: dict[str, Callable] = {}
_broken = False


def set_mode(value: str | None) -> None:
    """Force ``eager`` or ``compiled`` kernels for this process (``None``: back to the default)."""
    global _mode_override
    if value is not None and value not in _MODES:
        raise ValueError(f"gate kernel mode must be one of {_MODES}, got {value!r}")
    _mode_override = value


def mode() -> str:
    """The kernel mode in effect: :func:`set_mode`, else ``HF_SPARSE_GATE_KERNELS``, else ``auto``."""
    value = _mode_override or os.environ.get("HF_SPARSE_GATE_KERNELS", "auto")
    if value not in _MODES:
        raise ValueError(f"HF_SPARSE_GATE_KERNELS must be one of {_MODES}, got {value!r}")
    return value


def use_compiled(steps: int, gates: int) -> bool:
    """Whether a run of ``steps`` steps over ``gates`` unstructured gates uses compiled kernels."""
    m = mode()
    return not _broken and (m == "compiled" or (m == "auto" and steps * gates >= AUTO_MIN_WORK))


# -- the kernels (pure functions of flat tensors; 0-d tensors for every per-step scalar) ------------
def _sample(la: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, inv_beta: float):
    """(sigmoid s, clamped gate z, 1 where the stretched sample is inside [0, 1]) of one sample."""
    u = hc.hashed_uniform(index, keys)
    s = torch.sigmoid((torch.logit(u) + la.float()) * inv_beta)
    stretched = s * (hc.ZETA - hc.GAMMA) + hc.GAMMA
    z = stretched.clamp(0.0, 1.0)
    return s, z, (stretched == z).float()


def _index(la: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return torch.arange(la.numel(), dtype=torch.int32, device=la.device) + offset


def train_write(la: torch.Tensor, real: torch.Tensor, out: torch.Tensor, keys: torch.Tensor,
                offset: torch.Tensor, inv_beta: float, shift: float) -> torch.Tensor:
    """``out = real * z`` for this step's sample; returns ``sum P(z != 0)`` (the expected open gates)."""
    _, z, _ = _sample(la, _index(la, offset), keys, inv_beta)
    out.copy_(real.float() * z)
    return torch.sigmoid(la.float() - shift).sum()


def train_grads(la: torch.Tensor, real: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, keys: torch.Tensor,
                offset: torch.Tensor, inv_beta: float, shift: float, reg: torch.Tensor) -> torch.Tensor:
    """The chain rule through ``W * z`` for the recomputed sample, in one pass.

    ``grad`` (dL/d(W z)) becomes dL/dW = ``grad * z`` and ``param`` gets the real ``W`` back (both in
    place); returns dL/dlog_alpha = ``W grad dz/dlog_alpha + reg dP/dlog_alpha``, ``reg`` being the
    derivative of the regulariser by the expected open gates of this tensor (see ``L0``).
    ``dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta`` inside the clamp, else 0 (the convention of
    :func:`~.hard_concrete.sample_and_slope`).
    """
    s, z, inside = _sample(la, _index(la, offset), keys, inv_beta)
    w = real.float()
    g = grad.float()
    slope = (s - s * s) * ((hc.ZETA - hc.GAMMA) * inv_beta) * inside
    p = torch.sigmoid(la.float() - shift)
    la_grad = w * g * slope + reg * (p - p * p)
    grad.copy_(g * z)
    param.copy_(real)
    return la_grad.to(la.dtype)


def eval_write(la: torch.Tensor, real: torch.Tensor, param: torch.Tensor, inv_beta: float, store: bool) -> None:
    """Write ``W * z_det`` (the median gate); ``store``: first keep the stepped ``W`` the param holds."""
    if store:
        real.copy_(param)
    z = (torch.sigmoid(la.float() * inv_beta) * (hc.ZETA - hc.GAMMA) + hc.GAMMA).clamp(0.0, 1.0)
    param.copy_(real.float() * z)


_EAGER: dict[str, Callable] = {"train_write": train_write, "train_grads": train_grads, "eval_write": eval_write}


def kernel(name: str, compiled: bool) -> Callable:
    """The function ``name``, compiled (lazily, once per process; flat tensors of any length share one
    compilation) or eager."""
    if not compiled or _broken:
        return _EAGER[name]
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_EAGER[name], dynamic=True, fullgraph=True)
    return fn


def run(name: str, compiled: bool, *args):
    """Call kernel ``name``; if compilation fails (no C++ compiler, ...), warn once and go eager."""
    global _broken
    if not compiled or _broken:
        return _EAGER[name](*args)
    try:
        return kernel(name, True)(*args)
    except Exception as e:  # a missing compiler or an unsupported backend: the eager code is exact too
        _broken = True
        logger.warning("compiled gate kernels unavailable (%s: %s); using the eager ones", type(e).__name__, e)
        return _EAGER[name](*args)


__all__ = ["AUTO_MIN_WORK", "eval_write", "kernel", "mode", "run", "set_mode", "train_grads",
           "train_write", "use_compiled"]
