"""Dynamic Network Surgery (Guo, Yao & Chen 2016).

Each targeted weight W has a binary mask T; the forward pass uses ``W * T`` and the gradient with
respect to ``W * T`` updates *all* of W, so a pruned weight keeps training and can be *spliced*
back when it grows. Per layer, from the statistics of ``|W|`` when surgery starts:

    t = max(mean|W| + c * std|W|, 0),   a = 0.9 t,   b = 1.1 t
    surgery:  T = 0 where |W| <= a,   T = 1 where |W| > b,   unchanged in between.

Surgery runs at iteration ``iter`` with probability ``(1 + gamma * iter) ** -power`` (one draw per
iteration, from a generator seeded by (seed, iter), so every rank draws the same), and only before
``iter_stop``; afterwards T is frozen and W keeps training under it.

Target mode (``target_density`` set; hf_sparse's addition): instead of ``c``, each layer's t is the
magnitude that keeps the fraction d of its current weights, set when surgery starts and refreshed
at the first surgery ``recalibrate_every`` or more iterations after the last refresh; the hysteresis band a = 0.9t, b = 1.1t is the paper's. The
last surgery, at ``iter_stop``, always runs and keeps exactly the ``round(d * n)`` largest weights,
so each layer ends at density d.

Effective weights: between steps the target holds ``W * T``; the method keeps the dense W. After
backward the dense W is written back so the optimizer updates it; after the step it is saved
again and ``W * T`` written for the next forward (and for evaluation).
"""

from __future__ import annotations

import torch
from pydantic import Field

from . import register_method
from .base import MaskedMethod, MethodConfig, step_generator
from .schedules import kth_largest, resolve_step, topk_mask


class DNSConfig(MethodConfig):
    c: float = Field(3.0, description="threshold t = mean|W| + c * std|W| (paper mode; public code uses 3-4)")
    gamma: float = Field(1e-4, ge=0, description="surgery probability (1 + gamma * iter) ** -power")
    power: float = Field(1.0, ge=0, description="exponent of the surgery probability")
    band: tuple[float, float] = Field((0.9, 1.1), description="(a, b) = band * t: prune below a, splice above b")
    start_iter: int | None = Field(None, ge=0, description="first surgery (statistics taken here); default start_fraction")
    iter_stop: int | None = Field(None, ge=0, description="last surgery; default stop_fraction of the run")
    start_fraction: float = Field(0.0, ge=0, le=1, description="start_iter as a fraction of the optimizer steps")
    stop_fraction: float = Field(0.75, ge=0, le=1, description="iter_stop as a fraction of the optimizer steps")
    recalibrate_every: int = Field(100, ge=1, description="target mode: iterations between threshold refreshes")


@register_method
class DynamicNetworkSurgery(MaskedMethod):
    name = "dns"
    Config = DNSConfig
    target_density_mode = "optional"

    def __init__(self, targets, config, target_density, seed=0):
        super().__init__(targets, config, target_density, seed)
        self.dense = [t.param.detach().clone() for t in targets]
        self.ever_pruned = [torch.zeros_like(m) for m in self.masks]
        self.t = torch.zeros(len(targets), dtype=torch.float64)
        self.surgeries = 0
        self.calibrated_at = -1  # target mode: iteration of the last threshold refresh

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.start = resolve_step(c.start_iter, c.start_fraction, total_steps)
        self.stop = max(self.start, resolve_step(c.iter_stop, c.stop_fraction, total_steps))

    def surgery_probability(self, itr: int) -> float:
        return (1.0 + self.config.gamma * itr) ** -self.config.power

    def runs_surgery(self, itr: int) -> bool:
        """Whether surgery happens after iteration ``itr``: the paper's random schedule, same on every rank."""
        if itr < self.start or itr > self.stop:
            return False
        if itr in (self.start, self.stop) and self.target_density is not None:
            return True
        u = torch.rand((), generator=step_generator(self.seed, itr, "dns")).item()
        return u < self.surgery_probability(itr)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for t, w in zip(self.targets, self.dense):
            t.param.copy_(w)  # the gradient w.r.t. W*T now updates the dense W

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        for t, w in zip(self.targets, self.dense):
            w.copy_(t.param)
        if self.runs_surgery(step):
            self.set_thresholds(step)
            self.surgery(final=self.target_density is not None and step == self.stop)
        for t, w, k in zip(self.targets, self.dense, self.keep):
            torch.mul(w, k, out=t.param)

    def set_thresholds(self, step: int) -> None:
        if self.target_density is None:
            if self.surgeries == 0:
                for i, w in enumerate(self.dense):
                    a = w.abs()
                    self.t[i] = max(float(a.mean() + self.config.c * a.std()), 0.0)
        elif self.calibrated_at < 0 or step - self.calibrated_at >= self.config.recalibrate_every:
            for i, w in enumerate(self.dense):
                self.t[i] = kth_largest(w.abs(), round(self.target_density * w.numel()))
            self.calibrated_at = step

    def surgery(self, final: bool = False) -> None:
        lo, hi = self.config.band
        for i, (w, m, k, ever) in enumerate(zip(self.dense, self.masks, self.keep, self.ever_pruned)):
            a = w.abs()
            if final:
                new = topk_mask(a, round(self.target_density * a.numel()))
            else:
                # T stays 1 while |W| > a = lo*t and becomes 1 once |W| > b = hi*t: one comparison
                # against a per-weight threshold (lo*t where kept, hi*t where pruned) does both.
                t = float(self.t[i])
                new = a > k.mul((lo - hi) * t).add_(hi * t)
            ever |= ~new
            m.copy_(new)
        self.masks_changed()
        self.surgeries += 1

    def finalize(self) -> None:
        super().finalize()
        for w, t in zip(self.dense, self.targets):
            w.copy_(t.param)

    def spliced(self) -> int:
        """Weights that surgery pruned at some point and that are kept now: spliced back."""
        return int(sum((e & m).sum() for e, m in zip(self.ever_pruned, self.masks)))

    def metrics(self) -> dict[str, float]:
        return {"spliced": self.spliced(), "surgeries": self.surgeries,
                "pruned_now": int(sum((~m).sum() for m in self.masks)), "threshold_mean": float(self.t.mean())}

    def state_dict(self):
        return {**super().state_dict(), "dense": [w.clone() for w in self.dense],
                "ever_pruned": [e.clone() for e in self.ever_pruned], "t": self.t.clone(),
                "surgeries": self.surgeries, "calibrated_at": self.calibrated_at}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for dst, key in ((self.dense, "dense"), (self.ever_pruned, "ever_pruned")):
            for d, s in zip(dst, state[key]):
                d.copy_(s)
        self.t.copy_(state["t"])
        self.surgeries = int(state["surgeries"])
        self.calibrated_at = int(state["calibrated_at"])
