"""Per-layer sensitivity: prune one targeted layer at a time, one-shot, and measure what it costs.

For each targeted layer (each group grid of the recipe's granularity: a weight, or a recurrent
layer's gate blocks together, or a coupled channel group) and each density, the layer alone is
pruned one-shot by the recipe method's own score (mean ``|w|`` of a group for gmp, dns, l0 and
autoprune - the score their magnitude starts use -, max ``|w|`` for gradual), the model is
evaluated, and the layer is restored. The drop against the unpruned model is the layer's
sensitivity at that density.

From the drops, :func:`allocate` picks one density per layer (among the measured ones and 1)
keeping at most the overall target of the targeted weights with the least predicted loss, the
predicted loss being the sum of the layers' one-layer drops (interactions between layers are not
measured). The choice is written as a recipe fragment, ``sparsity.targets.density``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The group score each method ranks by (default: mean |w|).
METHOD_SCORE = {"gradual": "max"}
#: Metrics looked for in ``Trainer.evaluate()``, and whether higher is better.
METRICS = {"accuracy": True, "cer": False, "wer": False, "loss": False}


@dataclass
class Row:
    layer: str  # the grid's name
    weights: int  # targeted weights of the layer
    names: list[str]  # the weight parameters the layer covers
    density: float
    value: float
    drop: float  # metric points lost against the unpruned model (positive: worse)


def pick_metric(metrics: dict[str, float]) -> str:
    return next(m for m in METRICS if f"eval_{m}" in metrics)


def drop_of(metric: str, base: float, value: float) -> float:
    return (base - value) if METRICS[metric] else (value - base)


def measure(trainer, grids, densities: Sequence[float], how: str, rows: list[Row], progress=None) -> tuple[str, float]:
    """Fill ``rows`` layer by layer (so an interrupt keeps what was measured); (metric, unpruned value)."""
    import torch

    base_metrics = trainer.evaluate()
    metric = pick_metric(base_metrics)
    base = float(base_metrics[f"eval_{metric}"])
    for g in grids:
        saved = [m.param.detach().clone() for m in g.members]
        scores = g.score([m.param.detach() for m in g.weights], how)
        try:
            for d in densities:
                keep = g.select(scores, d)
                with torch.no_grad():
                    for m in g.members:
                        m.param.mul_(m.expand(keep).to(m.param.dtype))
                value = float(trainer.evaluate()[f"eval_{metric}"])
                with torch.no_grad():
                    for m, s in zip(g.members, saved):
                        m.param.copy_(s)
                rows.append(Row(g.name, g.numel, [m.target.name for m in g.weights], d, value,
                                drop_of(metric, base, value)))
                if progress is not None:
                    progress.update(1)
        finally:
            with torch.no_grad():
                for m, s in zip(g.members, saved):
                    m.param.copy_(s)
    return metric, base


def allocate(rows: Sequence[Row], target: float, bins: int = 4000) -> tuple[dict[str, float], float, float]:
    """One density per layer (a measured one, or 1) with total kept weights <= ``target`` of all and
    the least sum of one-layer drops: a knapsack over weight bins (rounded up, so the budget holds).
    Returns ({layer: density}, predicted drop, overall density)."""
    layers: dict[str, list[tuple[float, float]]] = {}
    sizes: dict[str, int] = {}
    for r in rows:
        layers.setdefault(r.layer, []).append((r.density, max(r.drop, 0.0)))
        sizes[r.layer] = r.weights
    total = sum(sizes.values())
    budget = target * total
    unit = budget / bins
    best: dict[int, tuple[float, dict[str, float]]] = {0: (0.0, {})}  # used bins -> (loss, choice)
    for name, options in layers.items():
        options = sorted(set(options) | {(1.0, 0.0)})
        nxt: dict[int, tuple[float, dict[str, float]]] = {}
        for used, (loss, choice) in best.items():
            for d, drop in options:
                cost = used + math.ceil(round(d * sizes[name]) / unit - 1e-9) if unit > 0 else used
                if cost > bins:
                    continue
                cand = (loss + drop, {**choice, name: d})
                if cost not in nxt or cand[0] < nxt[cost][0]:
                    nxt[cost] = cand
        best = nxt
    if not best:
        raise ValueError(f"no choice of the measured densities keeps at most {target:g} of the weights; "
                         f"measure a density of {target:g} or lower")
    loss, choice = min(best.values(), key=lambda v: (v[0], sum(round(d * sizes[n]) for n, d in v[1].items())))
    overall = sum(round(d * sizes[n]) for n, d in choice.items()) / total
    return choice, loss, overall


def write_csv(path: Path, metric: str, base: float, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "weights", "density", "metric", "value", "drop"])
        w.writerow(["(none)", sum({r.layer: r.weights for r in rows}.values()), 1.0, metric, repr(base), 0.0])
        for r in rows:
            w.writerow([r.layer, r.weights, r.density, metric, repr(r.value), repr(r.drop)])


def plot_heatmap(path: Path, metric: str, rows: Sequence[Row], title: str = "") -> None:
    """Layers x densities, each cell the metric drop (in points for accuracy/error rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = list(dict.fromkeys(r.layer for r in rows))
    densities = sorted({r.density for r in rows}, reverse=True)
    scale = 100.0 if metric in ("accuracy", "cer", "wer") else 1.0
    grid = np.full((len(layers), len(densities)), np.nan)
    for r in rows:
        grid[layers.index(r.layer), densities.index(r.density)] = scale * r.drop
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(densities), 1.2 + 0.4 * len(layers)), dpi=120)
    im = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=0)
    for i in range(len(layers)):
        for j in range(len(densities)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(densities)), [f"{d:g}" for d in densities])
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("density of the one pruned layer")
    unit = " (points)" if scale != 1 else ""
    ax.set_title(title or f"{metric} drop{unit}, one layer pruned at a time", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"{metric} drop{unit}")
    fig.tight_layout()
    fig.savefig(path, metadata={"hf_sparse_sensitivity": json.dumps([[r.layer, r.density, r.drop] for r in rows])})
    plt.close(fig)


def fragment(rows: Sequence[Row], choice: dict[str, float], target: float, loss: float, overall: float,
             metric: str, command: str = "") -> str:
    """The recipe fragment: ``sparsity.target_density`` and ``sparsity.targets.density`` per weight."""
    import yaml

    names = {r.layer: r.names for r in rows}
    per_weight = {n: float(choice[layer]) for layer in choice for n in names[layer]}
    scale = 100.0 if metric in ("accuracy", "cer", "wer") else 1.0
    head = [f"# {command}" if command else "# hf-sparse sensitivity",
            f"# per-layer densities keeping {overall:.4f} of the targeted weights (target {target:g}), chosen from "
            f"the one-layer drops; predicted {metric} drop {scale * loss:.2f}{' points' if scale != 1 else ''} "
            "(a sum of one-layer drops: interactions are not measured)",
            "# needs a method with per-layer targets (gmp, or gradual/dns with a target_density) and "
            "sparsity.params.scope: layer"]
    body = yaml.safe_dump({"sparsity": {"target_density": target, "targets": {"density": per_weight}}},
                          sort_keys=False)
    return "\n".join(head) + "\n" + body
