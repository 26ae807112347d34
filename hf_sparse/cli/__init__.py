"""``hf-sparse``: train or validate a recipe; export, inspect and push checkpoints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..training.recipe import RecipeError, load_recipe
from .checkpoint import add_subcommands
from .compare import add_subcommand as add_compare_subcommand


def _train(args: argparse.Namespace) -> int:
    from transformers.trainer_utils import get_last_checkpoint

    from ..training.run import execute_run, prepare_run, summary_table

    recipe = load_recipe(args.recipe, args.set)
    output_dir = Path(args.output_dir or recipe.training.get("output_dir") or f"runs/{Path(args.recipe).stem}")
    run = prepare_run(recipe, output_dir)
    resume = None
    if args.resume:
        resume = args.resume if args.resume != "last" else (get_last_checkpoint(str(output_dir)) if output_dir.exists() else None)
        if resume is None:
            raise RecipeError(f"no checkpoint to resume from in {output_dir}", "<command line>", ("--resume",))
    results = execute_run(run, resume_from_checkpoint=resume)
    if run.args.should_save:
        print(summary_table(results))
        print(f"run directory: {output_dir}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..training.run import prepare_run

    recipe = load_recipe(args.recipe, args.set)
    prepare_run(recipe, "unused-output-dir")
    print(f"{args.recipe}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"action": "extend", "nargs": "+", "default": [], "metavar": "KEY=VALUE",
                 "help": "override recipe keys, e.g. --set sparsity.target_density=0.1 training.seed=1 (repeatable)"}

    train = sub.add_parser("train", help="train a recipe and write the run directory")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("--output-dir", help="run directory (default: training.output_dir or runs/<recipe name>)")
    train.add_argument("--set", **overrides)
    train.add_argument("--resume", nargs="?", const="last", default=None, metavar="CHECKPOINT",
                       help="resume from CHECKPOINT, or from the last checkpoint in the run directory")
    train.set_defaults(func=_train)

    validate = sub.add_parser("validate", help="check a recipe (schema, data, model, targets) without training")
    validate.add_argument("recipe")
    validate.add_argument("--set", **overrides)
    validate.set_defaults(func=_validate)

    add_subcommands(sub)
    add_compare_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as e:
        print(f"hf-sparse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
