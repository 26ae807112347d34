"""The grid of ``hf-sparse compare``: methods x densities x seeds, each a normal ``hf-sparse train`` run.

Each cell is trained by its own ``python -m hf_sparse train`` subprocess with one intra-op thread,
into ``OUT/<method>/d<density>/s<seed>`` (the dense reference into ``OUT/dense/s<seed>``), so every
run of the grid can be inspected, resumed and exported like any other. A cell whose run directory
already holds its results and checkpoint is complete and is not run again: rerunning the same
command after an interruption finishes the grid. Ctrl-C (or SIGTERM) stops the running children
and leaves their half-written directories to be redone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.recipe import RecipeError, load_recipe

DENSE_LABEL = "dense"


@dataclass(frozen=True)
class GridRun:
    """One cell of the grid: a recipe trained at one density (None: dense) with one seed."""

    label: str
    recipe: Path
    density: float | None
    seed: int
    run_dir: Path
    sets: tuple[str, ...] = ()  # the user's --set overrides for this cell (before the grid's own)

    def overrides(self) -> list[str]:
        sets = [*self.sets, f"training.seed={self.seed}"]
        if self.density is not None:
            sets.insert(len(self.sets), f"sparsity.target_density={self.density:g}")
        return sets

    @property
    def complete(self) -> bool:
        return run_is_complete(self.run_dir)


def run_is_complete(run_dir: Path) -> bool:
    """A run is complete once ``results.json`` parses and the exported checkpoint is there."""
    try:
        json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / "model" / "sparsity.json").is_file()


def density_dir(density: float) -> str:
    return f"d{density:g}"


def family_prefix(recipe: Path) -> str | None:
    """The longest ``<prefix>`` such that ``<prefix>_dense.yaml`` sits next to ``recipe``."""
    parts = recipe.stem.split("_")
    for n in range(len(parts) - 1, 0, -1):
        prefix = "_".join(parts[:n])
        if (recipe.parent / f"{prefix}_dense{recipe.suffix}").is_file():
            return prefix
    return None


def method_label(recipe: Path, prefix: str | None) -> str:
    """``fmnist_lenet300_l0_constrained`` in family ``fmnist_lenet300`` -> ``l0_constrained``."""
    stem = recipe.stem
    return stem[len(prefix) + 1:] if prefix and stem.startswith(prefix + "_") else stem


def parse_sets(sets: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` arguments -> (overrides for every run, {variant: overrides}).

    ``KEY=VALUE`` applies to every run (``distillation.*`` keys to the sparse runs only: the dense
    reference is the usual teacher). ``VARIANT:KEY=VALUE`` adds a variant: every sparse recipe is also
    trained with these overrides, as method ``<method>+<VARIANT>`` (e.g. ``distill:distillation.teacher=self``).
    """
    common: list[str] = []
    variants: dict[str, list[str]] = {}
    for item in sets:
        head, eq, _ = item.partition("=")
        if not eq or not head:
            raise RecipeError(f"--set expects [VARIANT:]KEY=VALUE, got {item!r}", "<command line>", ("--set",))
        if ":" in head:
            name, _, rest = item.partition(":")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name == DENSE_LABEL:
                raise RecipeError(f"--set variant name {name!r}: use letters, digits, '_', '-', '.' (not "
                                  f"{DENSE_LABEL!r})", "<command line>", ("--set",))
            variants.setdefault(name, []).append(rest)
        else:
            common.append(item)
    return common, variants


def plan_grid(recipes: Sequence[str | Path], densities: Sequence[float], seeds: Sequence[int], out: Path,
              methods: Sequence[str] | None = None, dense: str | Path | None = None,
              sets: Sequence[str] = ()) -> list[GridRun]:
    """Every cell of the grid, seed by seed (so an interrupted grid has every cell's first seeds),
    each seed's dense reference first; RecipeError (exit 2) on any bad input.

    Every (recipe, density) pair is validated here, before anything is written or trained. ``sets``
    are ``--set`` overrides, see :func:`parse_sets`.
    """
    common, variants = parse_sets(sets)
    dense_sets = [s for s in common if not s.startswith("distillation.")]
    where = "<command line>"
    paths = [Path(r) for r in recipes]
    if dense is None:
        prefixes = {family_prefix(p) for p in paths}
        if None in prefixes or len(prefixes) != 1:
            raise RecipeError("cannot tell the dense reference: the recipes must share one family with a "
                              "<family>_dense.yaml next to them, or pass --dense RECIPE", where, ("--dense",))
        prefix = prefixes.pop()
        dense_path = paths[0].parent / f"{prefix}_dense{paths[0].suffix}"
    else:
        dense_path = Path(dense)
        prefix = dense_path.stem.removesuffix("_dense") if dense_path.stem.endswith("_dense") else None
    dense_recipe = load_recipe(dense_path, [*dense_sets, f"training.seed={seeds[0]}"])
    if dense_recipe.sparsity.method != "none":
        raise RecipeError(f"the dense reference {dense_path} has sparsity.method {dense_recipe.sparsity.method!r}, "
                          "not 'none'", where, ("--dense",))
    by_label: dict[str, Path] = {}
    for p in paths:
        if p.resolve() == dense_path.resolve():
            continue  # a glob like recipes/fmnist_lenet300_*.yaml brings the dense recipe along
        label = method_label(p, prefix)
        if label == DENSE_LABEL or label in by_label:
            raise RecipeError(f"two recipes would share the run folder {label!r}: {by_label.get(label, dense_path)} "
                              f"and {p}", where, ("RECIPE",))
        by_label[label] = p
    if methods:
        unknown = [m for m in methods if m not in by_label]
        if unknown:
            raise RecipeError(f"--methods names {', '.join(unknown)}, which no recipe given provides; "
                              f"known: {', '.join(by_label)}", where, ("--methods",))
        by_label = {m: by_label[m] for m in methods}
    if not by_label:
        raise RecipeError("no sparse recipe to compare", where, ("RECIPE",))
    cells: dict[str, tuple[Path, tuple[str, ...]]] = {}
    for label, p in by_label.items():
        cells[label] = (p, tuple(common))
        for name, extra in variants.items():
            cells[f"{label}+{name}"] = (p, (*common, *extra))
    for p, extra in cells.values():
        for d in densities:
            recipe = load_recipe(p, [*extra, f"sparsity.target_density={d:g}"])
            if recipe.sparsity.method == "none":
                raise RecipeError(f"{p} is a dense recipe; pass it as --dense", where, ("RECIPE",))
    grid = []
    for s in seeds:
        grid.append(GridRun(DENSE_LABEL, dense_path, None, s, out / DENSE_LABEL / f"s{s}", tuple(dense_sets)))
        grid += [GridRun(label, p, d, s, out / label / density_dir(d) / f"s{s}", extra)
                 for d in densities for label, (p, extra) in cells.items()]
    return grid


def train_command(run: GridRun) -> list[str]:
    cmd = [sys.executable, "-m", "hf_sparse", "train", str(run.recipe), "--output-dir", str(run.run_dir),
           "--set", *run.overrides()]
    if any(run.run_dir.glob("checkpoint-*")):
        cmd.append("--resume")  # an interrupted run that saved Trainer checkpoints continues from the last
    else:
        cmd.append("--overwrite")  # the cell's own train.log (and a half-written run) are in its folder
    return cmd


@dataclass
class GridOutcome:
    skipped: int
    finished: list[GridRun]
    failed: list[GridRun]


class _Interrupted(Exception):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted


def _stop(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> None:
    """End each child's whole process group (the child runs in its own session), then reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_grid(grid: Sequence[GridRun], jobs: int = 1, poll_s: float = 0.2) -> GridOutcome:
    """Train the incomplete cells, ``jobs`` at a time, with a progress bar over the whole grid.

    Raises KeyboardInterrupt after stopping every child when interrupted (SIGINT or SIGTERM).
    """
    from tqdm.auto import tqdm

    todo = [r for r in grid if not r.complete]
    outcome = GridOutcome(skipped=len(grid) - len(todo), finished=[], failed=[])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: dict[subprocess.Popen, tuple[GridRun, object]] = {}
    # SIGINT too: a shell starts background jobs (`cmd &`) with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt, so `kill -INT` would be lost.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=len(grid), initial=outcome.skipped, unit="run", desc="compare", dynamic_ncols=True)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run.run_dir / "train.log", "w")  # noqa: SIM115 (closed when the child ends)
                proc = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                running[proc] = (run, log)
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                run, log = running.pop(proc)
                log.close()
                (outcome.finished if proc.returncode == 0 and run.complete else outcome.failed).append(run)
                bar.update(1)
                bar.set_postfix_str(f"last: {run.label} {run.run_dir.parent.name} {run.run_dir.name}"
                                    + (f", {len(outcome.failed)} failed" if outcome.failed else ""))
    except (KeyboardInterrupt, _Interrupted):
        _stop(list(running))
        for _, log in running.values():
            log.close()
        raise KeyboardInterrupt from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    return outcome
