"""One recipe, end to end: validate everything, train, evaluate, export, write ``results.json``.

``prepare_run`` does all checks that can fail on bad input (schema, data, model, target patterns,
training arguments) and writes nothing; ``execute_run`` does the work. ``hf-sparse train`` and
``accelerate launch -m hf_sparse train`` both come through here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainingArguments, set_seed

from .. import __version__
from ..data import DataBundle, DataError, load_data
from ..methods.targets import TargetSpec, unmatched_patterns
from ..models import build_model
from .recipe import Recipe, RecipeError
from .sparsifier import dense_report

#: TrainingArguments defaults where hf_sparse differs from transformers (a recipe can override them).
TRAINING_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 50}


@dataclass
class PreparedRun:
    recipe: Recipe
    data: DataBundle
    model: nn.Module
    args: TrainingArguments


def training_arguments(recipe: Recipe, output_dir: str | Path) -> TrainingArguments:
    kwargs = {**TRAINING_DEFAULTS, **recipe.training, "output_dir": str(output_dir)}
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        key = next((k for k in recipe.training if k in str(e)), None)
        raise recipe.error(("training", key) if key else ("training",), str(e).splitlines()[0]) from None


def prepare_run(recipe: Recipe, output_dir: str | Path) -> PreparedRun:
    """Build data, model and arguments; raise RecipeError (located in the recipe) on any bad input."""
    args = training_arguments(recipe, output_dir)
    try:
        data = load_data(recipe.data)
    except DataError as e:
        field = e.key or ("hub_id" if recipe.data.hub_id else "path" if recipe.data.path else "name")
        raise recipe.error(("data", field), str(e)) from None
    except KeyError:
        from ..data import DATA_SOURCES

        raise recipe.error(("data", "name"), f"unknown data source {recipe.data.name!r}; "
                                             f"known: {', '.join(sorted(DATA_SOURCES))}") from None
    set_seed(args.seed)  # model initialisation is part of the run: same recipe, same model
    try:
        model = build_model(recipe.model, data)
    except (ValueError, OSError, KeyError) as e:
        raise recipe.error(("model",), f"cannot build the model: {e}") from None
    if recipe.sparsity.method != "none":
        spec = TargetSpec(**recipe.sparsity.targets.model_dump())
        for kind, pattern in unmatched_patterns(model, spec):
            index = getattr(spec, kind).index(pattern)
            raise recipe.error(("sparsity", "targets", kind, index),
                               f"pattern {pattern!r} matches no weight of the {'/'.join(spec.layer_types)} layers")
    return PreparedRun(recipe, data, model, args)


def make_trainer(run: PreparedRun):
    from .trainer import SparseTrainer

    return SparseTrainer(
        model=run.model, args=run.args, train_dataset=run.data.train, eval_dataset=run.data.eval,
        data_collator=run.data.collator, compute_metrics=run.data.compute_metrics,
        preprocess_logits_for_metrics=run.data.info.get("preprocess_logits_for_metrics"),
        processing_class=run.data.info.get("feature_extractor"), recipe=run.recipe)


def execute_run(run: PreparedRun, resume_from_checkpoint: str | bool | None = None) -> dict[str, Any]:
    """Train, evaluate, export ``model/`` and write ``results.json`` into ``args.output_dir``."""
    out = Path(run.args.output_dir)
    trainer = make_trainer(run)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    runtime = time.perf_counter() - started
    metrics = trainer.evaluate()
    model = trainer.model
    report = trainer.sparsifier.report(model) if trainer.sparsifier else dense_report(model)
    results = {
        "method": report["method"],
        "target_density": report["target_density"],
        "achieved_density": report["achieved_density"],
        "model_density": report["model_density"],
        "per_layer": {name: v["density"] for name, v in report["per_layer"].items()},
        "method_metrics": report["method_metrics"],
        "eval": {k.removeprefix("eval_"): v for k, v in metrics.items()},
        "train_runtime_s": runtime,
        "train_steps": train_output.global_step,
        "world_size": run.args.world_size,
        "hf_sparse_version": __version__,
    }
    if trainer.args.should_save:
        (out / "results.json").write_text(json.dumps(results, indent=2))
        trainer.save_sparse_model(out / "model", report=report, eval_metrics=results["eval"],
                                  dataset=run.data.card_name or None, task=run.data.task)
        export = run.recipe.export
        if export.push_to_hub:
            from ..checkpoint.hub import push_to_hub

            results["hub_commit"] = push_to_hub(out / "model", export.hub_model_id, private=export.private,
                                                revision=export.revision)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    trainer.accelerator.wait_for_everyone()
    return results


def summary_table(results: dict[str, Any]) -> str:
    target = results["target_density"]
    ev = results["eval"]
    metric = next((k for k in ("accuracy", "cer") if k in ev), "loss")
    rows = [("method", results["method"]), ("target density", "-" if target is None else f"{target:.4f}"),
            ("achieved density", f"{results['achieved_density']:.4f}"),
            (metric, f"{ev.get(metric, float('nan')):.4f}"),
            ("train time", f"{results['train_runtime_s']:.1f} s ({results['train_steps']} steps)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["PreparedRun", "RecipeError", "execute_run", "prepare_run", "summary_table"]
