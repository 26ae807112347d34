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
so each layer ends at density d. With ``scope: global`` one threshold is taken over all targets and
the last surgery keeps the largest weights of all targets together, so only the whole model is at
density d (a small output layer is not starved at extreme densities).

Granularity: T is one bit per group (:mod:`hf_sparse.grids`) and ``|W|`` above is the group's mean
``|w|``, so the statistics, thresholds and band keep the units of a weight. With N:M every surgery
keeps the N largest dense weights of every M (the band cannot hold N of M), still splicing.
``initial_sparsity`` (hf_sparse's addition, for pretrained models): T starts from a one-shot cut of
the lowest-mean-``|w|`` groups when the method is built, before step 0; surgery may splice them back.
The paper's names ``start_iter`` and ``iter_stop`` (``stop_fraction``) are accepted for
``start_step`` and ``end_step`` (``end_fraction``).

Effective weights: between steps the target holds ``W * T``; the method keeps the dense W (and,
at channel granularity, the dense biases and BatchNorm parameters of each unit) in a
:class:`~.reparam.RealWeights`. After backward the dense values are written back so the optimizer
updates them; after the step they are saved again and ``W * T`` written for the next forward.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import AliasChoices, Field

from ..grids import kept_weights
from . import bitset, register_method
from .base import MaskedMethod, MethodConfig, step_generator
from .reparam import RealWeights
from .schedules import (
    INITIAL_SPARSITY_HELP,
    LAYER_DENSITY_HELP,
    StepWindow,
    initial_sparsity_error,
    keep_per_layer,
    layer_densities,
    one_shot,
    thresholds_per_layer,
)


class DNSConfig(MethodConfig):
    c: float = Field(3.0, description="threshold t = mean|W| + c * std|W| (paper mode; public code uses 3-4)")
    gamma: float = Field(1e-4, ge=0, description="surgery probability (1 + gamma * iter) ** -power")
    power: float = Field(1.0, ge=0, description="exponent of the surgery probability")
    band: tuple[float, float] = Field((0.9, 1.1), description="(a, b) = band * t: prune below a, splice above b")
    start_step: int | None = Field(None, ge=0, validation_alias=AliasChoices("start_step", "start_iter"),
                                   description="first surgery, statistics taken here (paper: start_iter); "
                                               "default start_fraction")
    end_step: int | None = Field(None, ge=0, validation_alias=AliasChoices("end_step", "iter_stop"),
                                 description="last surgery (paper: iter_stop); default end_fraction of the run")
    start_fraction: float = Field(0.0, ge=0, le=1, description="start_step as a fraction of the optimizer steps")
    end_fraction: float = Field(0.75, ge=0, le=1, validation_alias=AliasChoices("end_fraction", "stop_fraction"),
                                description="end_step as a fraction of the optimizer steps")
    recalibrate_every: int = Field(100, ge=1, description="target mode: iterations between threshold refreshes")
    scope: Literal["layer", "global"] = Field(
        "layer", description="target mode: the density per layer, or over all targets with one threshold")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description=INITIAL_SPARSITY_HELP + " (pruned weights "
                                                                                       "keep training and may be spliced)")
    layer_density: dict[str, float] = Field(default_factory=dict, description="target mode: " + LAYER_DENSITY_HELP)


@register_method
class DynamicNetworkSurgery(MaskedMethod):
    name = "dns"
    Config = DNSConfig
    target_density_mode = "optional"
    supports_fsdp2 = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.real = RealWeights([m.target for m in self.covered])
        self.ever_pruned = [bitset.pack(torch.zeros_like(m)) for m in self.masks]  # packed: read by reports only
        self.t = torch.zeros(len(self.grids), dtype=torch.float64)
        self.surgeries = 0
        self.calibrated_at = -1  # target mode: iteration of the last threshold refresh
        self.layer_density = layer_densities(self, self.target_density)  # None: one target for every layer
        if self.config.initial_sparsity > 0:  # one-shot start: T from the dense |W|; W keeps training under it
            with torch.no_grad():
                one_shot(self, 1.0 - self.config.initial_sparsity, "mean", self.real.values)
                for ever, m in zip(self.ever_pruned, self.masks):
                    ever |= bitset.pack(~m)
                self.real.write(self._factors)

    @classmethod
    def config_error(cls, config: DNSConfig, target_density: float | None):
        return initial_sparsity_error(config.initial_sparsity, target_density)

    def setup(self, total_steps: int) -> None:
        super().setup(total_steps)
        c = self.config
        self.window = StepWindow.resolve(total_steps, c.start_step, c.start_fraction, c.end_step, c.end_fraction)
        self.real.follow()

    def surgery_probability(self, itr: int) -> float:
        return (1.0 + self.config.gamma * itr) ** -self.config.power

    def runs_surgery(self, itr: int) -> bool:
        """Whether surgery happens after iteration ``itr``: the paper's random schedule, same on every rank."""
        if not self.window.contains(itr):
            return False
        if itr in (self.window.start, self.window.end) and self.target_density is not None:
            return True
        u = torch.rand((), generator=step_generator(self.seed, itr, "dns")).item()
        return u < self.surgery_probability(itr)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        self.real.restore()  # the gradient w.r.t. W*T now updates the dense W

    @torch.no_grad()
    def after_step(self, step: int, optimizer) -> None:
        self.real.store()
        if self.runs_surgery(step):
            scores = self.group_scores("mean", self.real.values)
            self.set_thresholds(step, scores)
            self.surgery(scores, final=self.target_density is not None and step == self.window.end)
        self.real.write(self._factors)

    def set_thresholds(self, step: int, scores: list[torch.Tensor]) -> None:
        if self.target_density is None:
            if self.surgeries == 0:
                for i, (g, a) in enumerate(zip(self.grids, scores)):
                    mean, std = g.mean_std(a)  # the whole layer's statistics
                    self.t[i] = max(float(mean + self.config.c * std), 0.0)
        elif self.calibrated_at < 0 or step - self.calibrated_at >= self.config.recalibrate_every:
            self.t.copy_(torch.tensor(thresholds_per_layer(self, scores, self.target_density)))
            self.calibrated_at = step

    def surgery(self, scores: list[torch.Tensor], final: bool = False) -> None:
        lo, hi = self.config.band
        kept = keep_per_layer(self, scores, self.target_density) if final else None
        for i, (g, a, m, ever) in enumerate(zip(self.grids, scores, self.masks, self.ever_pruned)):
            # T stays 1 while |W| > a = lo*t and becomes 1 once |W| > b = hi*t (N:M: the N largest)
            new = kept[i] if final else g.hysteresis(a, m, float(self.t[i]), (lo, hi), self.target_density)
            ever |= bitset.pack(~new)
            m.copy_(new)
        self.masks_changed()
        self.surgeries += 1

    def finalize(self) -> None:
        super().finalize()
        self.real.store()

    def _weights(self, flags: list[torch.Tensor]) -> int:
        return int(kept_weights(self.grids, flags))

    def spliced(self) -> int:
        """Weights that surgery pruned at some point and that are kept now: spliced back."""
        return self._weights([bitset.unpack(e, m.shape) & m for e, m in zip(self.ever_pruned, self.masks)])

    def metrics(self) -> dict[str, float]:
        return {"spliced": self.spliced(), "surgeries": self.surgeries,
                "pruned_now": self._weights([~m for m in self.masks]), "threshold_mean": float(self.t.mean())}

    def state_dict(self):
        return {**super().state_dict(), "dense": self.real.state_dict(),
                "ever_pruned": [e.clone() for e in self.ever_pruned], "t": self.t.clone(),
                "surgeries": self.surgeries, "calibrated_at": self.calibrated_at}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.real.load_state_dict(state["dense"])
        for d, s in zip(self.ever_pruned, state["ever_pruned"], strict=True):
            d.copy_(bitset.pack(s) if s.dtype == torch.bool else s)  # bool: a checkpoint from before packing
        self.t.copy_(state["t"])
        self.surgeries = int(state["surgeries"])
        self.calibrated_at = int(state["calibrated_at"])
