"""What ``hf-sparse compare`` writes from a finished (or partly finished) grid.

``summary.csv`` (one row per method x density, plus the dense reference), ``summary.md`` (mean ± sd
per method x density, the best per density in bold), ``pareto.png`` (metric vs density on a log
axis, one line per method, the dense reference as a horizontal band) and ``README.md`` showing both.
All four are drawn from the same list of :class:`Cell` s, and the picture carries that list in its
PNG metadata (key ``hf_sparse_series``), so the picture can be checked against the table.

Rows come from every ``OUT/<label>/d<density>/s<seed>/results.json`` at the requested densities and
seeds, so results written there by other tools in the same layout (``bench/bench_vs_torch_ao.py``)
appear as rows of their own.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .grid import DENSE_LABEL, density_dir

#: Metrics in the order they are looked for in ``results.json["eval"]``, and whether higher is better.
METRICS = {"accuracy": True, "cer": False, "wer": False, "loss": False}


@dataclass
class Cell:
    """One method at one density: the metric of each seed found."""

    label: str
    density: float | None  # None: the dense reference
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    achieved: list[float] = field(default_factory=list)
    distillation: list[dict | None] = field(default_factory=list)  # each run's results.json "distillation"

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        """Sample standard deviation over seeds (nan with fewer than two)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


def pick_metric(results: Sequence[dict]) -> str:
    for name in METRICS:
        if any(name in r.get("eval", {}) for r in results):
            return name
    raise ValueError("no run reports any of " + ", ".join(METRICS))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(out: Path, labels: Sequence[str], densities: Sequence[float], seeds: Sequence[int]
            ) -> tuple[str, Cell, list[Cell]]:
    """(metric, dense cell, method cells) from the run directories under ``out``.

    ``labels`` come first in the given order; any other folder of ``out`` laid out the same way
    (e.g. a torch.ao baseline) follows, sorted by name.
    """
    extra = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != DENSE_LABEL
                   and p.name not in labels and any(p.glob("d*/s*/results.json"))) if out.is_dir() else []
    found: dict[tuple[str, float | None], tuple[Cell, list[dict]]] = {}
    for label, dens in [(DENSE_LABEL, [None])] + [(lab, list(densities)) for lab in [*labels, *extra]]:
        for d in dens:
            cell, runs = Cell(label, d), []
            for s in seeds:
                base = out / label if d is None else out / label / density_dir(d)
                r = _read(base / f"s{s}" / "results.json")
                if r is not None:
                    cell.seeds.append(s)
                    runs.append(r)
            found[(label, d)] = (cell, runs)
    metric = pick_metric([r for _, runs in found.values() for r in runs])
    for cell, runs in found.values():
        for r in runs:
            cell.values.append(float(r["eval"].get(metric, math.nan)))
            cell.achieved.append(float(r.get("achieved_density", math.nan)))
            cell.distillation.append(r.get("distillation"))
    cells = [c for (label, d), (c, _) in found.items() if label != DENSE_LABEL]
    return metric, found[(DENSE_LABEL, None)][0], cells


def _scale(metric: str) -> float:
    """Accuracy and error rates are shown in percent."""
    return 100.0 if metric in ("accuracy", "cer", "wer") else 1.0


def format_cell(cell: Cell, metric: str) -> str:
    if not cell.values:
        return "–"
    k = _scale(metric)
    text = f"{k * cell.mean:.2f}" if len(cell.values) == 1 else f"{k * cell.mean:.2f} ± {k * cell.sd:.2f}"
    return text


def best_labels(cells: Sequence[Cell], metric: str) -> dict[float, set[str]]:
    """Per density, the method(s) with the best mean (ties all bold)."""
    higher = METRICS[metric]
    best: dict[float, set[str]] = {}
    for d in {c.density for c in cells}:
        here = [c for c in cells if c.density == d and c.values]
        if here:
            top = (max if higher else min)(c.mean for c in here)
            best[d] = {c.label for c in here if c.mean == top}
    return best


def markdown_table(metric: str, dense: Cell, cells: Sequence[Cell], densities: Sequence[float],
                   seeds: Sequence[int]) -> str:
    unit = " (%)" if _scale(metric) != 1 else ""
    best = best_labels(cells, metric)
    labels = list(dict.fromkeys(c.label for c in cells))
    by_key = {(c.label, c.density): c for c in cells}
    lines = [f"| method | {' | '.join(f'density {d:g}' for d in densities)} |",
             "|---|" + "---|" * len(densities)]
    for label in labels:
        row = []
        for d in densities:
            cell = by_key[(label, d)]
            text = format_cell(cell, metric)
            row.append(f"**{text}**" if label in best.get(d, ()) else text)
        lines.append(f"| {label} | {' | '.join(row)} |")
    note = (f"{metric}{unit}, mean ± sd over seeds {', '.join(map(str, seeds))} (sample sd; one value: one seed); "
            f"best per density in bold. Dense reference (density 1): {format_cell(dense, metric)}"
            f" ({len(dense.values)} seed{'s' if len(dense.values) != 1 else ''}).")
    incomplete = [f"{c.label} d{c.density:g} ({len(c.values)} of {len(seeds)})" for c in cells
                  if len(c.values) < len(seeds)]
    if incomplete:
        note += " Missing seeds: " + ", ".join(incomplete) + "."
    return "\n".join(lines) + "\n\n" + note + "\n" + distillation_note(dense, cells)


def distillation_note(dense: Cell, cells: Sequence[Cell]) -> str:
    """Which rows distilled, from what teacher with which settings; '' when no run did."""
    used: dict[str, set[str]] = {}
    for c in [dense, *cells]:
        for d in c.distillation:
            if d:
                used.setdefault(c.label, set()).add(f"teacher {d.get('teacher')}, alpha {d.get('alpha')}, "
                                                    f"T {d.get('temperature')}, {d.get('loss')}")
    if not used:
        return ""
    rows = "; ".join(f"{label} ({' | '.join(sorted(how))})" for label, how in used.items())
    others = [c.label for c in cells if c.label not in used]
    rest = f" Without distillation: {', '.join(dict.fromkeys(others))}." if others else ""
    return f"\nDistilled: {rows}.{rest}\n"


def write_csv(path: Path, metric: str, dense: Cell, cells: Sequence[Cell]) -> None:
    def num(x: float) -> str:
        return "" if math.isnan(x) else repr(x)

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "target_density", "metric", "n_seeds", "mean", "sd", "achieved_density_mean",
                    "seeds", "values"])
        for c in [dense, *cells]:
            achieved = statistics.fmean(c.achieved) if c.achieved else math.nan
            w.writerow([c.label, "" if c.density is None else f"{c.density:g}", metric, len(c.values),
                        num(c.mean), num(c.sd), num(achieved), " ".join(map(str, c.seeds)),
                        " ".join(repr(v) for v in c.values)])


def series(metric: str, dense: Cell, cells: Sequence[Cell]) -> dict:
    """What the picture plots, in plotted units: the same numbers the table prints."""
    k = _scale(metric)
    lines: dict[str, list[list[float]]] = {}
    for c in cells:
        if c.values:
            lines.setdefault(c.label, []).append([c.density, k * c.mean, 0.0 if math.isnan(c.sd) else k * c.sd])
    for pts in lines.values():
        pts.sort()
    ref = [k * dense.mean, 0.0 if math.isnan(dense.sd) else k * dense.sd] if dense.values else None
    return {"metric": metric, "lines": lines, "dense": ref}


def plot_pareto(path: Path, metric: str, dense: Cell, cells: Sequence[Cell], title: str = "") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(metric, dense, cells)
    unit = " (%)" if _scale(metric) != 1 else ""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, pts in data["lines"].items():
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=label)
    if data["dense"] is not None:
        m, s = data["dense"]
        ax.axhline(m, color="black", linestyle="--", linewidth=1, label=f"dense ({m:.2f})")
        if s:
            ax.axhspan(m - s, m + s, color="black", alpha=0.08)
    densities = sorted({p[0] for pts in data["lines"].values() for p in pts})
    ax.set_xscale("log")
    if densities:
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.minorticks_off()
    ax.set_xlabel("density (kept fraction of the targeted weights, log scale)")
    ax.set_ylabel(metric + unit)
    ax.set_title(title or f"{metric} vs density")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"hf_sparse_series": json.dumps(data)})
    plt.close(fig)
    return data


def write_summary(out: Path, labels: Sequence[str], densities: Sequence[float], seeds: Sequence[int],
                  command: str = "", failed: Sequence[str] = (), name: str = "") -> str:
    """Write summary.csv, summary.md, pareto.png and README.md into ``out``; return the table.

    ``name`` (e.g. the model family) titles the picture and the README; default: the folder's name.
    """
    name = name or out.name
    metric, dense, cells = collect(out, labels, densities, seeds)
    table = markdown_table(metric, dense, cells, densities, seeds)
    write_csv(out / "summary.csv", metric, dense, cells)
    (out / "summary.md").write_text(table)
    plot_pareto(out / "pareto.png", metric, dense, cells, title=f"{name}: {metric} vs density")
    readme = [f"# hf-sparse compare: {name}", ""]
    if command:
        readme += ["```", command, "```", ""]
    readme += [table, "![metric vs density](pareto.png)", "",
               "Each run is a normal `hf-sparse train` run directory: `<method>/d<density>/s<seed>/` "
               "(`results.json`, `model/`, `train.log`); the dense reference is `dense/s<seed>/`. "
               "`summary.csv` holds the same figures unrounded, with each seed's value.", ""]
    if failed:
        readme += ["Failed runs (see their `train.log`):", ""] + [f"- `{f}`" for f in failed] + [""]
    (out / "README.md").write_text("\n".join(readme))
    return table
