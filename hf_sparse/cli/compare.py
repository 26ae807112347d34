"""``hf-sparse compare``: parse the grid's arguments, train what is missing, write the summaries."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"densities must lie in (0, 1], got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _compare(args: argparse.Namespace) -> int:
    # here, not at the top: `hf-sparse --help` must not import torch
    from ..compare import plan_grid, run_grid, write_summary
    from ..config.recipe import RecipeError

    if args.jobs < 1:
        raise RecipeError("--jobs must be at least 1", "<command line>", ("--jobs",))
    out = Path(args.out)
    grid = plan_grid(args.recipes, args.density, args.seeds, out, methods=args.methods, dense=args.dense,
                     sets=args.set)
    labels = list(dict.fromkeys(r.label for r in grid if r.density is not None))
    command = shlex.join(["hf-sparse", "compare", *map(str, args.recipes),
                          "--density", ",".join(f"{d:g}" for d in args.density),
                          "--seeds", ",".join(map(str, args.seeds)),
                          *(["--methods", ",".join(args.methods)] if args.methods else []),
                          *(["--dense", str(args.dense)] if args.dense else []),
                          *[arg for item in args.set for arg in ("--set", item)],
                          "--jobs", str(args.jobs), "--out", str(args.out)])
    try:
        outcome = run_grid(grid, jobs=args.jobs)
    except KeyboardInterrupt:
        done = sum(r.complete for r in grid)
        print(f"\ninterrupted: {done} of {len(grid)} runs complete; run the same command again to finish "
              "the grid", file=sys.stderr)
        return 130
    failed = [str(r.run_dir) for r in outcome.failed]
    family = grid[0].recipe.stem.removesuffix("_dense")  # the dense reference comes first
    table = write_summary(out, labels, args.density, args.seeds, command=command, failed=failed, name=family)
    print(table)
    print(f"{len(outcome.finished)} trained, {outcome.skipped} already complete, {len(failed)} failed; "
          f"summary in {out / 'README.md'}")
    for f in failed:
        print(f"failed: {f} (see {Path(f) / 'train.log'})", file=sys.stderr)
    return 1 if failed else 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare", help="train methods x densities x seeds side by side; write summary.md/csv and pareto.png",
        description="Run every (recipe, density, seed) as a normal `hf-sparse train` run in OUT/<method>/"
                    "d<density>/s<seed> (the family's dense recipe once per seed in OUT/dense/s<seed>), skip "
                    "runs already complete, and summarise. Rerun the same command to finish an interrupted grid.")
    compare.add_argument("recipes", nargs="+", metavar="RECIPE", help="sparse recipes of one model family")
    compare.add_argument("--density", type=_floats, default=[0.5, 0.2, 0.1, 0.05, 0.02],
                         help="comma-separated target densities (default 0.5,0.2,0.1,0.05,0.02)")
    compare.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    compare.add_argument("--methods", type=_names, default=None,
                         help="only these methods (recipe names without the family prefix, e.g. gmp,dns)")
    compare.add_argument("--dense", default=None,
                         help="dense reference recipe (default: <family>_dense.yaml next to the recipes)")
    compare.add_argument("--set", action="append", default=[], metavar="[VARIANT:]KEY=VALUE",
                         help="recipe override for every run (distillation.* keys: the sparse runs only); with "
                              "VARIANT: every sparse recipe also runs with it as <method>+VARIANT, e.g. "
                              "--set distill:distillation.teacher=self (repeatable)")
    compare.add_argument("--jobs", type=int, default=1, help="runs in parallel, one intra-op thread each")
    compare.add_argument("--out", required=True, help="output folder for the runs and the summaries")
    compare.set_defaults(func=_compare)
