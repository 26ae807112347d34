"""The Hard Concrete gate distribution (Louizos, Welling & Kingma 2018), shared by the L0 family.

A gate ``z`` in [0, 1] with location ``log_alpha`` is a stretched, clamped binary Concrete sample::

    u ~ U(0, 1)   (hashed_uniform: 2^23 equally likely midpoints (k + 1/2) / 2^23)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

The stretch puts real probability mass on exactly 0 and exactly 1, so sampled gates prune for
real, yet ``z`` stays differentiable in ``log_alpha`` (reparametrisation), and the probability
that a gate is open has a closed form, which makes the expected L0 norm differentiable too.

Deterministic gate. We use Gallego-Posada et al.'s (2022) convention, the temperature inside the
sigmoid: ``z_det = clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)``. It is the
*median* of the distribution (the sample at u = 1/2), so ``z_det > 0`` exactly when
``P(z != 0) > 1/2``: the deterministic keep decision agrees with the gate's own odds. (Louizos'
``sigmoid(log_alpha)`` form keeps gates whose open probability is as low as 0.31.)

All gate math runs in float32 whatever the autocast dtype: bf16 cannot resolve the small
differences of ``log u - log(1 - u)`` near the ends or the tails of the sigmoid.
"""

from __future__ import annotations

import hashlib
import math

import torch

GAMMA = -0.1  # stretch interval lower end
ZETA = 1.1  # stretch interval upper end
BETA = 2.0 / 3.0  # temperature
EPS = 2.0**-24  # the smallest noise value (and 1 - EPS the largest): log(u) and log(1 - u) stay finite
#: log_alpha is clamped to this range after every update: beyond it a gate is open or closed with
#: probability > 1 - 3e-4, and larger values only slow down a later change of mind.
LOG_ALPHA_RANGE = (-10.0, 10.0)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def init_log_alpha(shape: tuple[int, ...] | torch.Size, drop_rate: float, generator: torch.Generator,
                   std: float = 0.01) -> torch.Tensor:
    """``N(log((1 - p) / p), std^2)`` with ``p`` the initial drop rate (Louizos' init)."""
    if not 0.0 < drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in (0, 1), got {drop_rate}")
    mean = math.log(1.0 - drop_rate) - math.log(drop_rate)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32) * std + mean


# murmur3's 32-bit finaliser constants, as signed int32 (the arithmetic wraps modulo 2^32)
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B1 - 2**32, 0x85EBCA6B - 2**32, 0xC2B2AE35 - 2**32


def _fmix_(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int32, in place (``>>`` is arithmetic on int32, hence the masks:
    logical shifts). In-place ops: each new 1 MB temporary cost a page-faulting allocation eagerly."""
    for shift, mask, mix in ((16, 0xFFFF, _MIX1), (13, 0x7FFFF, _MIX2), (16, 0xFFFF, None)):
        t = x >> shift
        x ^= t.bitwise_and_(mask)
        if mix is not None:
            x *= mix
    return x


def step_keys(seed: int, step: int, salt: str = "") -> tuple[int, int]:
    """Two int32 keys from (seed, step, salt): with :func:`hashed_uniform` a noise stream per step and
    tensor that is the same on every rank and after a resume, without any saved RNG state."""
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return tuple(int.from_bytes(digest[i:i + 4], "little", signed=True) for i in (0, 4))


def hashed_uniform(index: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Counter-based noise: ``u`` of element ``index`` (int32) under ``keys`` (int32 tensor of two).

    Two rounds of murmur3's finaliser over ``index * golden + key0`` (then ``^ key1``) give 32 mixed
    bits; their top 23 make ``u = (k + 1/2) / 2^23``. Integer arithmetic and an exact conversion, so
    eager, compiled CPU and CUDA code all produce the same bits, and each element's value depends on
    its index only (a shard computes its own slice; nothing is drawn sequentially). The values are
    symmetric about 1/2 and lie in ``[EPS, 1 - EPS]``, so ``log u - log(1 - u)`` is finite.
    Replaces a ``torch.rand`` draw from a per-step CPU generator: 1.36 ms of an L0 step's 2.14 ms
    before the forward on LeNet-300-100's 266k gates (one thread).
    """
    x = index * _GOLDEN
    x += keys[0]
    _fmix_(x)
    x ^= keys[1]
    _fmix_(x)
    x >>= 9
    return x.bitwise_and_(0x7FFFFF).float().add_(0.5).mul_(2.0**-23)


def uniform(shape: tuple[int, ...] | torch.Size, keys: tuple[int, int], offset: int = 0,
            device: torch.device | str | None = None) -> torch.Tensor:
    """The noise of a tensor of ``shape`` whose first element has flat index ``offset`` (see
    :func:`hashed_uniform`; an FSDP2 shard passes its rows' offset and gets its slice of the
    one-process noise)."""
    n = math.prod(shape)
    index = torch.arange(offset, offset + n, dtype=torch.int32, device=device)
    return hashed_uniform(index, torch.tensor(keys, dtype=torch.int32, device=device)).view(tuple(shape))


def logistic_noise(u: torch.Tensor) -> torch.Tensor:
    """``log u - log(1 - u)``: the part of a sample that does not depend on ``log_alpha``.

    Computed as ``torch.logit(u)``, one vectorised op. The two-op form ``log(u) - log1p(-u)``
    agrees to 1e-6 (absolute, on values within +-14) but took 4.16 ms against 0.66 ms on CPU for
    LeNet-300-100's 266k gates (one thread, ``bench/bench_elementwise.py``), and the noise is drawn
    for every gate at every training step.
    """
    return torch.logit(_fp32(u))


def sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """A gate sample for noise ``u``; differentiable in ``log_alpha``."""
    with torch.autocast(log_alpha.device.type, enabled=False):
        s = torch.sigmoid((logistic_noise(u).to(log_alpha.device) + _fp32(log_alpha)) / beta)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


@torch.no_grad()
def sample_and_slope(log_alpha: torch.Tensor, noise: torch.Tensor,
                     beta: float = BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, dz/dlog_alpha)`` for a stored :func:`logistic_noise`, without autograd.

    The training hot path: ``dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta`` where the stretched
    sample lies in [0, 1], else 0. That is autograd's gradient through :func:`sample` except where
    the stretched sample is *exactly* 0 or 1 (float32 hits those): torch's clamp passes no gradient
    there, this keeps the inside value (both are valid sub-gradients; this one is what every
    measured result in docs/ used). The indicator ``1 - sign(|stretched - z|)`` stays in float
    arithmetic: on CPU, masking with a bool tensor took about 3x as long as this whole function.
    """
    s = torch.add(noise, _fp32(log_alpha)).mul_(1.0 / beta).sigmoid_()
    stretched = s * (ZETA - GAMMA) + GAMMA
    z = stretched.clamp(0.0, 1.0)
    inside = stretched.sub_(z).abs_().sign_().neg_().add_(1.0)
    slope = (s - s * s).mul_((ZETA - GAMMA) / beta).mul_(inside)
    return z, slope


def prob_nonzero(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``; differentiable."""
    with torch.autocast(log_alpha.device.type, enabled=False):
        return torch.sigmoid(_fp32(log_alpha) - beta * math.log(-GAMMA / ZETA))


def expected_l0(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """Expected number of open gates, ``sum P(z != 0)``."""
    return prob_nonzero(log_alpha, beta).sum()


def deterministic(log_alpha: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """The median gate ``clamp(sigmoid(log_alpha / beta) * (zeta - gamma) + gamma, 0, 1)``."""
    with torch.autocast(log_alpha.device.type, enabled=False):
        return (torch.sigmoid(_fp32(log_alpha) / beta) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def clamp_(log_alpha: torch.Tensor) -> torch.Tensor:
    """Clamp gate locations in place to :data:`LOG_ALPHA_RANGE`."""
    with torch.no_grad():
        return log_alpha.clamp_(*LOG_ALPHA_RANGE)


__all__ = ["BETA", "EPS", "GAMMA", "LOG_ALPHA_RANGE", "ZETA", "clamp_", "deterministic", "expected_l0",
           "hashed_uniform", "init_log_alpha", "logistic_noise", "prob_nonzero", "sample", "sample_and_slope",
           "step_keys", "uniform"]
