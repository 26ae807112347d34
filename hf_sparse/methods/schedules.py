"""Schedules as small objects: when a method acts and how its target moves over a run.

Each resolves fractions of the run against Trainer's ``max_steps`` once, in the method's ``setup``;
an explicit step always wins over a fraction. Steps are 0-based counts of optimizer steps taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..grids import keep_top, pattern_matches, thresholds


def resolve_step(step: int | None, fraction: float, total_steps: int) -> int:
    """An explicit step wins; otherwise ``fraction`` of the run's optimizer steps."""
    return step if step is not None else int(round(fraction * total_steps))


@dataclass(frozen=True)
class StepWindow:
    """Steps ``start..end`` with an update every ``frequency`` steps (and always at ``end``)."""

    start: int
    end: int
    frequency: int = 1

    @classmethod
    def resolve(cls, total_steps: int, start_step: int | None, start_fraction: float, end_step: int | None,
                end_fraction: float, frequency: int = 1) -> StepWindow:
        start = resolve_step(start_step, start_fraction, total_steps)
        return cls(start, max(start, resolve_step(end_step, end_fraction, total_steps)), frequency)

    def is_update_step(self, step: int) -> bool:
        return step == self.end or (self.start <= step < self.end and (step - self.start) % self.frequency == 0)

    def contains(self, step: int) -> bool:
        return self.start <= step <= self.end

    def progress(self, t: float) -> float:
        """Fraction of the window elapsed at time ``t``, clamped to [0, 1]."""
        span = self.end - self.start
        return 1.0 if span <= 0 else min(1.0, max(0.0, (t - self.start) / span))


@dataclass(frozen=True)
class CubicSchedule:
    """Zhu & Gupta's (2017) cubic: ``s_t = s_f + (s_i - s_f) * (1 - progress)**3``, as a density."""

    initial_density: float
    final_density: float
    window: StepWindow

    def __call__(self, t: float) -> float:
        s_i, s_f = 1.0 - self.initial_density, 1.0 - self.final_density
        return 1.0 - (s_f + (s_i - s_f) * (1.0 - self.window.progress(t)) ** 3)


@dataclass(frozen=True)
class NarangThreshold:
    """Narang et al.'s (2017) two-slope threshold over ``start <= itr <= end``, slope change at ``ramp``:

        eps = theta * (itr - start + 1) / freq                                   itr < ramp
        eps = (theta * (ramp - start + 1) + phi * (itr - ramp + 1)) / freq       itr >= ramp

    with ``theta = 2 q freq / (2 (ramp - start) + 3 (end - ramp))`` from the layer's percentile
    ``q`` of ``|W|``, and ``phi = ramp_ratio * theta``.
    """

    start: int
    ramp: int
    end: int
    freq: int

    def slopes(self, q: float, ramp_ratio: float, theta: float | None = None,
               phi: float | None = None) -> tuple[float, float]:
        """(theta, phi): the paper's heuristic, unless given."""
        theta = theta or 2 * q * self.freq / max(2 * (self.ramp - self.start) + 3 * (self.end - self.ramp), 1)
        return theta, phi or ramp_ratio * theta

    def __call__(self, itr: int, theta: float, phi: float) -> float:
        if itr < self.ramp:
            return theta * (itr - self.start + 1) / self.freq
        return (theta * (self.ramp - self.start + 1) + phi * (itr - self.ramp + 1)) / self.freq


@dataclass(frozen=True)
class LinearWarmup:
    """A value ramping linearly from ``initial`` to ``final`` over the first ``steps`` steps."""

    initial: float
    final: float
    steps: int

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step + 1 >= self.steps:
            return self.final
        return self.initial - (self.initial - self.final) * (step + 1) / self.steps


#: Help text of the ``initial_sparsity`` parameter of gmp, gradual and dns.
INITIAL_SPARSITY_HELP = ("one-shot start for a pretrained model: prune this fraction of the targeted weights by the "
                         "method's own score when the method is built (before step 0 and any eval_on_start); the "
                         "schedule then starts from it")


def initial_sparsity_error(initial_sparsity: float, target_density: float | None) -> tuple[tuple[str, ...], str] | None:
    """An ``initial_sparsity`` that would leave fewer weights than the target: the schedule would have to regrow."""
    if target_density is not None and initial_sparsity > 1.0 - target_density + 1e-9:
        return ("params", "initial_sparsity"), (f"{initial_sparsity:g} prunes more than the target sparsity "
                                                f"{1.0 - target_density:g}; use at most that")
    return None


def one_shot(method, density: float, how: str, values: list | None = None) -> None:
    """Set a masked method's masks to keep the best ``density`` of the groups by its score ``how``
    ("mean" or "max" of ``|w|``, of ``values`` or the weights now), per layer or over all targets as
    its ``scope`` says. The caller then applies the masks to the weights (zeroing or writing W*T)."""
    scores = method.group_scores(how, values)
    for mask, keep in zip(method.masks, keep_top(method.grids, scores, density, getattr(method.config, "scope", "layer"))):
        mask.copy_(keep)
    method.masks_changed()


#: Help text of the ``layer_density`` parameter (filled from ``sparsity.targets.density``).
LAYER_DENSITY_HELP = ("per-layer target densities {pattern: density}, first match wins, other layers get "
                      "target_density; set it as sparsity.targets.density")


def layer_densities(method, default: float | None) -> list[float] | None:
    """Per grid, the density of the first ``layer_density`` pattern matching one of its weights, else
    ``default``; None when the method has no per-layer densities. A pattern matching nothing is an error."""
    spec = getattr(method.config, "layer_density", None)
    if not spec or default is None:
        return None
    names = [[m.target.name for m in g.weights] for g in method.grids]
    unmatched = [p for p in spec if not any(pattern_matches(p, n) for grid in names for n in grid)]
    if unmatched:
        raise ValueError(f"sparsity.targets.density pattern {unmatched[0]!r} matches no targeted weight")
    return [float(next((v for p, v in spec.items() if any(pattern_matches(p, n) for n in grid)), default))
            for grid in names]


def keep_per_layer(method, scores: list, density: float, densities: list[float] | None = None) -> list:
    """:func:`~hf_sparse.grids.keep_top` at the method's scope, or each grid at its own density."""
    densities = densities or getattr(method, "layer_density", None)
    if densities is None:
        return keep_top(method.grids, scores, density, getattr(method.config, "scope", "layer"))
    return [g.select(s, d) for g, s, d in zip(method.grids, scores, densities)]


def thresholds_per_layer(method, scores: list, density: float) -> list[float]:
    """:func:`~hf_sparse.grids.thresholds` at the method's scope, or each grid at its own density."""
    if getattr(method, "layer_density", None) is None:
        return thresholds(method.grids, scores, density, getattr(method.config, "scope", "layer"))
    return [g.threshold(s, d) for g, s, d in zip(method.grids, scores, method.layer_density)]
