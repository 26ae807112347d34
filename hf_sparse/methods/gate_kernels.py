"""Fused per-step arithmetic of unstructured Hard Concrete gates (one gate per weight), and of
AutoPrune's auxiliary parameters when there is one per weight (``ap_*``, see :mod:`.autoprune`).

L0 training touches every gate three times per step: the sample and the effective weight
``W * z`` before the forward, the gradients after backward, and the evaluation weight after the
optimizer step. Written as separate torch ops that is a dozen passes over the
weights; here each of the three is one function of flat tensors, which ``torch.compile`` turns into
one loop per tensor on CPU (inductor's C++ backend, vectorised) and on CUDA (Triton).

The noise is the counter-based :func:`~.hard_concrete.hashed_uniform` (integer arithmetic only), so
a compiled kernel computes exactly the bits the eager code computes, draws it inline without a
generator, and needs no stored noise: after backward the sample and its slope come from the
sample's ``s`` kept through the step (``train_write_keep`` / ``train_grads_kept``, L0's default
``keep_sample``), or are recomputed from the logits and the step's key (``train_write`` /
``train_grads``); nothing per gate is stored between steps.

The methods call the kernels through :func:`run_many`: one compiled call per hook for up to
:data:`MANY` grids (dynamo's per-call overhead, ~25 us, otherwise paid once per grid).

Every function runs eagerly too (same formulas; results agree to float32 rounding, about 1e-7
relative, with the compiled ones). :func:`mode` picks: ``eager``, ``compiled``, or ``auto`` (the
default, ``HF_SPARSE_GATE_KERNELS`` overrides it): compiled when a run is long enough to repay the
compilation (a one-time ~10-30 s on CPU), i.e. when ``steps * gates >= AUTO_MIN_WORK``. Short runs
and the tests stay eager; a compiler failure falls back to eager with a warning.
"""

from __future__ import annotations

import logging
import math
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
def _odds(la: torch.Tensor, inv_beta: float, shift: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(``exp(-log_alpha / beta)`` where the sample uses it, ``P(z != 0) = sigmoid(log_alpha - shift)``).

    At the default temperature (``beta = 2/3``) both come from one ``q = exp(-log_alpha / 2)``:
    ``exp(-1.5 log_alpha) = q^3`` and ``P = 1 / (1 + exp(shift) q^2)``.
    """
    la = la.float()
    if inv_beta == 1.5:
        q = torch.exp(-0.5 * la)
        q2 = q * q
        return q2 * q, 1.0 / (1.0 + math.exp(shift) * q2)
    return None, torch.sigmoid(la - shift)


def _sample(la: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, inv_beta: float, e: torch.Tensor | None):
    """(sigmoid s, clamped gate z, 1 where the stretched sample is inside [0, 1]) of one sample.

    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``. At ``beta = 2/3`` (``e`` from
    :func:`_odds`) it is computed as ``1 / (1 + r sqrt(r) e)`` with ``r = (1 - u) / u``: the same
    number without a ``log`` (``exp(-x) = r^(1/beta) exp(-log_alpha / beta)``), and closer to it (max
    relative error against float64 4.4e-7, against 2.4e-6 of the sigmoid-of-logit form in float32).
    """
    u = hc.hashed_uniform(index, keys)
    if e is not None:
        r = (1.0 - u) / u
        s = 1.0 / (1.0 + r * torch.sqrt(r) * e)
    else:
        s = torch.sigmoid((torch.logit(u) + la.float()) * inv_beta)
    stretched = s * (hc.ZETA - hc.GAMMA) + hc.GAMMA
    z = stretched.clamp(0.0, 1.0)
    return s, z, (stretched == z).float()


def _index(la: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return torch.arange(la.numel(), dtype=torch.int32, device=la.device) + offset


def train_write(la: torch.Tensor, real: torch.Tensor, out: torch.Tensor, keys: torch.Tensor,
                offset: torch.Tensor, inv_beta: float, shift: float) -> torch.Tensor:
    """``out = real * z`` for this step's sample; returns ``sum P(z != 0)`` (the expected open gates)."""
    e, p = _odds(la, inv_beta, shift)
    _, z, _ = _sample(la, _index(la, offset), keys, inv_beta, e)
    out.copy_(real.float() * z)
    return p.sum()


def train_grads(la: torch.Tensor, real: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, keys: torch.Tensor,
                offset: torch.Tensor, inv_beta: float, shift: float, reg: torch.Tensor) -> torch.Tensor:
    """The chain rule through ``W * z`` for the recomputed sample, in one pass.

    ``grad`` (dL/d(W z)) becomes dL/dW = ``grad * z`` and ``param`` gets the real ``W`` back (both in
    place); returns dL/dlog_alpha = ``W grad dz/dlog_alpha + reg dP/dlog_alpha``, ``reg`` being the
    derivative of the regulariser by the expected open gates of this tensor (see ``L0``).
    ``dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta`` inside the clamp, else 0 (the convention of
    :func:`~.hard_concrete.sample_and_slope`).
    """
    e, p = _odds(la, inv_beta, shift)
    s, z, inside = _sample(la, _index(la, offset), keys, inv_beta, e)
    w = real.float()
    g = grad.float()
    slope = (s - s * s) * ((hc.ZETA - hc.GAMMA) * inv_beta) * inside
    la_grad = w * g * slope + reg * (p - p * p)
    grad.copy_(g * z)
    param.copy_(real)
    return la_grad.to(la.dtype)


def train_write_keep(la: torch.Tensor, real: torch.Tensor, out: torch.Tensor, keys: torch.Tensor,
                     offset: torch.Tensor, inv_beta: float, shift: float, s_out: torch.Tensor) -> torch.Tensor:
    """:func:`train_write`, also keeping the sample's ``s`` in ``s_out`` for :func:`train_grads_kept`."""
    e, p = _odds(la, inv_beta, shift)
    s, z, _ = _sample(la, _index(la, offset), keys, inv_beta, e)
    out.copy_(real.float() * z)
    s_out.copy_(s)
    return p.sum()


def train_grads_kept(la: torch.Tensor, real: torch.Tensor, grad: torch.Tensor, param: torch.Tensor,
                     s: torch.Tensor, inv_beta: float, shift: float, reg: torch.Tensor) -> torch.Tensor:
    """:func:`train_grads` from the ``s`` that :func:`train_write_keep` kept: the same values, without
    drawing the noise and the sample again (``z`` and the slope are functions of ``s``)."""
    _, p = _odds(la, inv_beta, shift)
    stretched = s * (hc.ZETA - hc.GAMMA) + hc.GAMMA
    z = stretched.clamp(0.0, 1.0)
    w = real.float()
    g = grad.float()
    slope = (s - s * s) * ((hc.ZETA - hc.GAMMA) * inv_beta) * (stretched == z).float()
    la_grad = w * g * slope + reg * (p - p * p)
    grad.copy_(g * z)
    param.copy_(real)
    return la_grad.to(la.dtype)


def eval_write(la: torch.Tensor, real: torch.Tensor, param: torch.Tensor, inv_beta: float, store: bool,
               clamp: bool = False) -> None:
    """Write ``W * z_det`` (the median gate); ``store``: first keep the stepped ``W`` the param holds;
    ``clamp``: first clamp the logits in place to :data:`~.hard_concrete.LOG_ALPHA_RANGE` (after a step)."""
    if store:
        real.copy_(param)
    if clamp:
        la.copy_(la.clamp(*hc.LOG_ALPHA_RANGE))
    z = (torch.sigmoid(la.float() * inv_beta) * (hc.ZETA - hc.GAMMA) + hc.GAMMA).clamp(0.0, 1.0)
    param.copy_(real.float() * z)


# -- AutoPrune, one m per weight (unstructured / N:M): the method's two per-weight passes ----------
def _ste_grad(m: torch.Tensor, ste: str, arg: float) -> torch.Tensor:
    """h'(m) of :func:`~.autoprune.ste_grad` (``arg``: the leaky slope or the softplus beta)."""
    if ste == "identity":
        return torch.ones_like(m)
    if ste == "leaky_relu":
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, arg))
    return torch.sigmoid(arg * m)


def ap_grads(m: torch.Tensor, real: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, keep: torch.Tensor,
             reg: torch.Tensor, ste: str, arg: float) -> torch.Tensor:
    """AutoPrune after backward, in one pass: returns dL/dm = ``h'(m) (g sgn(W) + reg)``; ``grad``
    (dL/d(W h(M))) becomes ``g h(M)`` and ``param`` gets the real ``W`` back (both in place).

    ``keep`` is the h(M) in effect as ``uint8`` 0/1 (the bool mask viewed, no copy). Inductor's CPU
    code loads a bool tensor as a vector mask and blends or stores with it about 15x slower than it
    converts uint8 to float and back (0.9 against 0.06 ms over 235k weights, one thread), so the
    AutoPrune kernels multiply by 0/1 floats and never select with a loaded mask.
    """
    g = grad.float()
    m_grad = _ste_grad(m, ste, arg) * (g * torch.sign(real) + reg)
    grad.copy_(g * keep)
    param.copy_(real)
    return m_grad


def ap_frozen_grads(real: torch.Tensor, grad: torch.Tensor, param: torch.Tensor, keep: torch.Tensor) -> None:
    """AutoPrune after backward with frozen masks: ``grad *= h(M)`` and the real ``W`` back into ``param``."""
    grad.copy_(grad * keep)
    param.copy_(real)


def ap_step(m: torch.Tensor, real: torch.Tensor, param: torch.Tensor, keep: torch.Tensor, ever: torch.Tensor,
            states: list[torch.Tensor], frozen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoPrune after the optimizer step, in one pass over a grid of one m per weight.

    The stepped ``W`` is stored where ``keep`` (the mask in effect, uint8 0/1; a pruned weight keeps
    its old value); unless ``frozen``, ``keep`` becomes the new mask ``m > 0``, the weights it
    restores are marked in ``ever`` (uint8) and their optimizer ``states`` zeroed; ``W * h(M)`` is
    written into ``param``. All in place. Returns (restored weights, kept weights) of the new mask.

    The store is ``keep * param + (1 - keep) * real``: exact for finite values (a product with 1 or
    0, then a sum with a zero), like the ``lerp`` it replaces; a state is multiplied by 1 (kept) or
    0 (restored), as the per-event ``mul_(1 - back)`` did.
    """
    f = keep.float()
    w = f * param + (1.0 - f) * real
    real.copy_(w)
    if frozen:
        param.copy_(w * f)
        return torch.zeros((), dtype=torch.float64, device=m.device), f.sum(dtype=torch.float64)
    new = (m > 0).float()
    param.copy_(w * new)
    back = new * (1.0 - f)
    for s in states:
        s.copy_(s * (1.0 - back))
    keep.copy_(new.to(torch.uint8))
    ever.copy_(torch.maximum(ever, back.to(torch.uint8)))
    return back.sum(dtype=torch.float64), new.sum(dtype=torch.float64)


def _ap_grads_eager(m, real, grad, param, keep, reg, ste, arg) -> torch.Tensor:
    """:func:`ap_grads` as eager torch ops (the same values; mixed-dtype ops are slow eagerly)."""
    corr = grad.float() * torch.sign(real)
    m_grad = _ste_grad(m, ste, arg).mul_(corr.add_(reg))
    grad.mul_(keep)
    param.copy_(real)
    return m_grad


def _ap_step_eager(m, real, param, keep, ever, states, frozen):
    """:func:`ap_step` as eager torch ops (the same values, up to the sign of a zeroed state)."""
    kb = keep.view(torch.bool)
    real.copy_(torch.where(kb, param, real))
    if frozen:
        torch.mul(real, keep, out=param)
        return torch.zeros((), dtype=torch.int64), kb.count_nonzero()
    new = m > 0
    torch.mul(real, new, out=param)
    back = new & ~kb
    n = back.count_nonzero()
    if int(n):
        for s in states:
            s.masked_fill_(back, 0.0)
        ever.view(torch.bool).logical_or_(back)
    kb.copy_(new)
    return n, new.count_nonzero()


#: name -> what runs eagerly; :data:`_TRACED` -> what is compiled (where it differs)
_EAGER: dict[str, Callable] = {"train_write": train_write, "train_grads": train_grads, "eval_write": eval_write,
                               "train_write_keep": train_write_keep, "train_grads_kept": train_grads_kept,
                               "ap_grads": _ap_grads_eager, "ap_frozen_grads": ap_frozen_grads,
                               "ap_step": _ap_step_eager}
_TRACED: dict[str, Callable] = {**_EAGER, "ap_grads": ap_grads, "ap_step": ap_step}


def kernel(name: str, compiled: bool) -> Callable:
    """The function ``name``, compiled (lazily, once per process; flat tensors of any length share one
    compilation) or eager."""
    if not compiled or _broken:
        return _EAGER[name]
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_TRACED[name], dynamic=True, fullgraph=True)
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


#: grids per compiled call of :func:`run_many` (one call per hook saves dynamo's per-call guard
#: evaluation, ~25 us a call; more grids per graph make the one-time compilation longer)
MANY = 8
_compiled_many: dict[str, Callable] = {}


def _many(fn: Callable, name: str) -> Callable:
    def many(entries: list[dict], shared: dict) -> list:
        return [fn(**entry, **shared) for entry in entries]

    # a code object of its own per kernel: dynamo keeps its compiled graphs (and counts them against
    # its recompile limit, 8) per code object, and every kernel has a few (chunk lengths, flags)
    many.__code__ = many.__code__.replace(co_name=f"many_{name}")
    return many


def run_many(name: str, compiled: bool, entries: list[dict], **shared) -> list:
    """Kernel ``name`` on each grid's keyword arguments ``entries`` (plus the ``shared`` ones), in
    order; compiled, up to :data:`MANY` grids run in one call. Falls back to eager like :func:`run`."""
    global _broken
    if not compiled or _broken or not entries:
        return [_EAGER[name](**e, **shared) for e in entries]
    out: list = []
    try:
        fn = _compiled_many.get(name)
        if fn is None:
            fn = _compiled_many[name] = torch.compile(_many(_TRACED[name], name), dynamic=True, fullgraph=True)
        for i in range(0, len(entries), MANY):
            out.extend(fn(entries[i:i + MANY], shared))  # (a chunk that fails to compile has not run)
        return out
    except Exception as err:  # a missing compiler or an unsupported backend: the eager code is exact too
        _broken = True
        logger.warning("compiled gate kernels unavailable (%s: %s); using the eager ones", type(err).__name__, err)
        return out + [_EAGER[name](**e, **shared) for e in entries[len(out):]]


__all__ = ["AUTO_MIN_WORK", "MANY", "ap_frozen_grads", "ap_grads", "ap_step", "eval_write", "kernel", "mode", "run",
           "run_many", "set_mode", "train_grads", "train_grads_kept", "train_write", "train_write_keep",
           "use_compiled"]
