"""``hf-sparse sensitivity RECIPE``: how much each targeted layer can be pruned, one layer at a time."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .compare import _floats


def _sensitivity(args: argparse.Namespace) -> int:
    # here, not at the top: `hf-sparse --help` must not import torch
    from ..config.recipe import RecipeError, load_recipe

    out = Path(args.out or f"runs/sensitivity_{Path(args.recipe).stem}")
    sets = list(args.set) + (["sparsity.granularity=" + args.granularity] if args.granularity else [])
    recipe = load_recipe(args.recipe, sets)
    if recipe.sparsity.granularity_spec().fixed_density is not None:
        raise RecipeError(f"granularity {recipe.sparsity.granularity!r} fixes the density; sensitivity needs "
                          "one whose density is free", "<command line>", ("--granularity",))
    target = args.target or recipe.sparsity.target_density
    if target is None:
        raise RecipeError("the overall density to allocate is unknown: set sparsity.target_density or --target",
                          "<command line>", ("--target",))
    model_path = args.model or recipe.model.path
    if model_path is None:  # no trained model given: train the recipe dense first (once)
        model_path = _train_dense(args.recipe, sets, out / "dense")
    densities = sorted(set(args.densities) | {target}, reverse=True)
    return _measure(args, recipe, sets, str(model_path), densities, target, out)


def _train_dense(recipe_path: str, sets: list[str], run_dir: Path) -> Path:
    """Train the recipe without sparsity into ``run_dir`` (skipped when it already finished); its model."""
    from ..config.recipe import load_recipe
    from ..training.run import execute_run, is_finished_run, prepare_run

    if not is_finished_run(run_dir):
        print(f"no trained model given (model.path or --model): training the recipe dense into {run_dir}",
              file=sys.stderr)
        dense = load_recipe(recipe_path, [*sets, "sparsity={method: none}", "distillation=null"])
        execute_run(prepare_run(dense, run_dir))
    return run_dir / "model"


def _measure(args, recipe, sets, model_path, densities, target, out) -> int:
    from tqdm.auto import tqdm
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from ..compare import sensitivity as sens
    from ..config.recipe import load_recipe
    from ..grids import TargetSpec, build_grids, resolve_targets
    from ..training.run import prepare_run

    evaluated = load_recipe(args.recipe, [*sets, f"model.path={model_path}", "training.disable_tqdm=true",
                                          "distillation=null"])
    run = prepare_run(evaluated, out / "eval")
    model = run.model.eval()
    trainer = Trainer(model=model, args=run.args, eval_dataset=run.data.eval, data_collator=run.data.collator,
                      compute_metrics=run.data.compute_metrics,
                      preprocess_logits_for_metrics=run.data.info.get("preprocess_logits_for_metrics"))
    trainer.remove_callback(PrinterCallback)  # the progress bar says enough; no dict per evaluation
    targets = resolve_targets(model, TargetSpec(**evaluated.sparsity.targets.model_dump()))
    grids = build_grids(targets, evaluated.sparsity.granularity_spec(), model)
    how = sens.METHOD_SCORE.get(evaluated.sparsity.method, "mean")
    out.mkdir(parents=True, exist_ok=True)
    rows: list[sens.Row] = []
    command = shlex.join(["hf-sparse", "sensitivity", args.recipe, "--densities", ",".join(f"{d:g}" for d in
                                                                                         args.densities),
                          *[a for s in args.set for a in ("--set", s)],
                          *(["--granularity", args.granularity] if args.granularity else []),
                          *(["--model", args.model] if args.model else []),
                          *(["--target", f"{args.target:g}"] if args.target else [])])
    bar = tqdm(total=len(grids) * len(densities), unit="eval", desc="sensitivity", dynamic_ncols=True)
    interrupted = False
    metric, base = "accuracy", float("nan")
    try:
        metric, base = sens.measure(trainer, grids, densities, how, rows, progress=bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    if not rows:
        print("interrupted before any layer was measured; nothing written", file=sys.stderr)
        return 130
    sens.write_csv(out / "sensitivity.csv", metric, base, rows)
    sens.plot_heatmap(out / "sensitivity.png", metric, rows,
                      title=f"{Path(args.recipe).stem}: {metric} drop, one layer pruned at a time")
    measured = {r.layer for r in rows}
    complete = [r for r in rows if sum(x.layer == r.layer for x in rows) == len(densities)]
    if not interrupted or len(measured) == len(grids):
        choice, loss, overall = sens.allocate(complete, target)
        text = sens.fragment(complete, choice, target, loss, overall, metric, command)
        (out / "suggested_densities.yaml").write_text(text)
        print(text)
    print(f"{len(rows)} evaluations ({len(measured)} of {len(grids)} layers; unpruned {metric} {base:.4f}); "
          f"{out / 'sensitivity.csv'}, {out / 'sensitivity.png'}"
          + ("" if interrupted else f", {out / 'suggested_densities.yaml'}"))
    if interrupted:
        print("interrupted: the CSV and the heat map hold the layers measured so far; no densities suggested",
              file=sys.stderr)
        return 130
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity", help="prune one targeted layer at a time, evaluate, and suggest per-layer densities",
        description="Prune each targeted layer alone, one-shot by the recipe method's own score, at each density; "
                    "evaluate; write sensitivity.csv, sensitivity.png (layers x densities, metric drop) and "
                    "suggested_densities.yaml (sparsity.targets.density meeting the overall target with the least "
                    "predicted loss). The model is model.path (or --model); without either the recipe is first "
                    "trained dense into OUT/dense. Ctrl-C keeps what was measured.")
    p.add_argument("recipe", metavar="RECIPE")
    p.add_argument("--densities", type=_floats, default=[0.5, 0.2, 0.1, 0.05],
                   help="comma-separated densities of the pruned layer (default 0.5,0.2,0.1,0.05; the target is added)")
    p.add_argument("--granularity", default=None, help="override sparsity.granularity (e.g. channel, block)")
    p.add_argument("--model", default=None, help="the trained model: a checkpoint folder or run directory's "
                                                  "model/ (default: the recipe's model.path)")
    p.add_argument("--target", type=float, default=None, help="overall density to allocate (default: the recipe's "
                                                              "sparsity.target_density)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/sensitivity_<recipe>)")
    p.set_defaults(func=_sensitivity)
