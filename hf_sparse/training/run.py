"""One recipe, end to end: validate everything, train, evaluate, export, write ``results.json``.

``prepare_run`` does all checks that can fail on bad input (schema, data, model, target patterns,
training arguments) and writes nothing; ``execute_run`` does the work. ``hf-sparse train`` and
``accelerate launch -m hf_sparse train`` both come through here.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments, set_seed

from .. import __version__
from ..checkpoint.formats import CHECKPOINT_FORMATS
from ..checkpoint.save_and_load import load_stored_sparse
from ..config.recipe import Recipe, RecipeError, RecipeWarning
from ..data import DataBundle, DataError, load_data
from ..grids import target_problem
from ..grids.targets import TargetSpec, resolve_targets, unmatched_patterns
from ..models import build_model, forward_problem
from ..models.build import PretrainedError
from .report import SparsityReport
from .sparsifier import dense_report

#: TrainingArguments defaults where hf_sparse differs from transformers (a recipe can override them).
TRAINING_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 50}


@dataclass
class PreparedRun:
    recipe: Recipe
    data: DataBundle
    model: nn.Module
    args: TrainingArguments
    teacher: nn.Module | None = None  # the loaded distillation teacher (None: none, or ``self``)


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``) started for this run."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def training_defaults() -> dict[str, Any]:
    """TRAINING_DEFAULTS, plus real DDP on CPU when several processes were launched without CUDA.

    ``accelerate launch --multi_gpu --num_processes 2`` on a machine without CUDA starts two
    processes; without ``use_cpu``/``gloo`` each would train alone. A recipe can still override both.
    """
    defaults = dict(TRAINING_DEFAULTS)
    if launched_processes() > 1 and not torch.cuda.is_available():
        defaults.update(use_cpu=True, ddp_backend="gloo")
    return defaults


def training_arguments(recipe: Recipe, output_dir: str | Path) -> TrainingArguments:
    kwargs = {**training_defaults(), **recipe.training, "output_dir": str(output_dir)}
    try:
        args = TrainingArguments(**kwargs)
    except Exception as e:  # noqa: BLE001 - any refusal of TrainingArguments is a recipe error
        key = next((k for k in recipe.training if k in str(e)), None)
        raise recipe.error(("training", key) if key else ("training",),
                           (str(e).strip().splitlines() or [type(e).__name__])[0]) from None
    from transformers.training_args import ParallelMode

    launched = launched_processes()
    if launched > 1 and (args.world_size != launched or args.parallel_mode != ParallelMode.DISTRIBUTED):
        raise recipe.error(("training",), f"{launched} processes were launched but the model would not be trained "
                                          f"data-parallel (world size {args.world_size}, {args.parallel_mode.value}: "
                                          "each rank alone, masks diverging); on CPU set training.use_cpu=true "
                                          "and training.ddp_backend=gloo")
    return args


#: Bounds past which a run is meaningless (and would only fail, or never end, after writing files).
MAX_STEPS = 10**9
MAX_BATCH = 2**31 - 1


def _check_training_values(recipe: Recipe, args: TrainingArguments, train_size: int) -> None:
    """Values TrainingArguments accepts although no run can use them (a negative learning rate...)."""
    def bad(key: str, message: str) -> RecipeError:
        return recipe.error(("training", key), message)

    if not args.learning_rate > 0:
        raise bad("learning_rate", f"must be a positive number, got {args.learning_rate!r}")
    _check_trainer_only_values(recipe, args)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, key)
        if not 1 <= value <= MAX_BATCH:
            raise bad(key, f"must be an integer in [1, {MAX_BATCH}], got {value!r}")
    if args.max_steps == 0 or args.max_steps < -1 or args.max_steps > MAX_STEPS:
        raise bad("max_steps", f"must be -1 (train num_train_epochs) or in [1, {MAX_STEPS}], got {args.max_steps!r}")
    if args.max_steps > 0:
        return
    if not args.num_train_epochs > 0:
        raise bad("num_train_epochs", f"must be positive (or set max_steps), got {args.num_train_epochs!r}")
    steps = optimizer_steps(args, train_size)
    if steps > MAX_STEPS:
        raise bad("num_train_epochs", f"{args.num_train_epochs!r} epochs are {steps:.3g} optimizer steps; "
                                      f"at most {MAX_STEPS} are allowed")


def optimizer_steps(args: TrainingArguments, train_size: int) -> float:
    """The optimizer steps the run will take (``max_steps``, else the epochs' worth)."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(train_size / (args.per_device_train_batch_size * max(args.world_size, 1)))
    return args.num_train_epochs * max(batches // args.gradient_accumulation_steps, 1)


#: Method parameters that name the step a method starts acting at (the papers' names included).
START_KEYS = ("start_step", "start_itr", "start_iter")


def _check_method_can_act(recipe: Recipe, model: nn.Module, args: TrainingArguments, train_size: int) -> None:
    """A method that would never act, or would remove every weight, is a recipe error, not a
    model labelled sparse: a schedule starting after the last step leaves it dense; a block bigger
    than a layer makes the layer one block, which a density below 1 prunes whole."""
    sparsity = recipe.sparsity
    steps = optimizer_steps(args, train_size)
    for key in START_KEYS:
        start = (sparsity.params or {}).get(key)
        if isinstance(start, (int, float)) and not isinstance(start, bool) and start >= steps:
            raise recipe.error(("sparsity", "params", key), f"{start!r} is at or after the run's end ({steps:g} "
                                                            "optimizer steps): the method would never act and the "
                                                            "model would stay dense")
    spec = sparsity.granularity_spec()
    density = sparsity.target_density
    if density is not None and density < 1:
        for t in resolve_targets(model, TargetSpec(**sparsity.targets.model_dump())):
            problem = spec.density_problem(t, density)
            if problem is not None:
                raise recipe.error(("sparsity", problem[0]), problem[1])


def _check_trainer_only_values(recipe: Recipe, args: TrainingArguments) -> None:
    """Values TrainingArguments accepts and only Trainer (after the run directory exists) refuses."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [r for r in args.report_to or [] if r not in INTEGRATION_TO_CALLBACK and r not in ("none", "all")]
    if unknown:
        raise recipe.error(("training", "report_to"), f"unknown logging integration {unknown[0]!r}; known: "
                                                      f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, all, none")
    if args.dataloader_num_workers < 0:
        raise recipe.error(("training", "dataloader_num_workers"),
                           f"must be 0 or more, got {args.dataloader_num_workers!r}")
    if args.push_to_hub:
        raise recipe.error(("training", "push_to_hub"), "Trainer's own push would bypass hf_sparse's checkpoint "
                                                        "and Hub handling; set export.push_to_hub: true and "
                                                        "export.hub_model_id instead")


def _build_model(recipe: Recipe, data: DataBundle) -> nn.Module:
    """build_model, with any failure located at the ``model.config``/``model.kwargs`` key that causes it."""
    try:
        model = build_model(recipe.model, data, load_stored_sparse)
    except PretrainedError as e:
        raise recipe.error(("model", e.key), str(e)) from None
    except Exception as e:  # noqa: BLE001 - TypeError/RuntimeError/... from model code are recipe errors
        message = f"cannot build the model: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        raise recipe.error(_culprit(recipe, data, str(e)), message) from None
    unknown = _unknown_config_keys(recipe, model)
    if unknown:
        own = [p for p in inspect.signature(type(model.config).__init__).parameters if p not in ("self", "kwargs")]
        raise recipe.error(("model", "config", unknown[0]),
                           f"not a field of {type(model.config).__name__}; its own fields: {', '.join(own)}")
    return model


def _culprit(recipe: Recipe, data: DataBundle, message: str) -> tuple:
    """The model option a build failure comes from: named in the message, else the one that fails alone."""
    options = [("config", k) for k in recipe.model.config if k != "model_type"] + \
              [("kwargs", k) for k in recipe.model.kwargs]
    named = [o for o in options if re.search(rf"\b{re.escape(o[1])}\b", message)]
    if named:
        return ("model", *named[0])
    for section, key in options:
        alone = {"config": {k: v for k, v in recipe.model.config.items() if k == "model_type"}, "kwargs": {}}
        alone[section] = {**alone[section], key: getattr(recipe.model, section)[key]}
        try:
            build_model(recipe.model.model_copy(update=alone), data, load_stored_sparse)
        except Exception:  # noqa: BLE001
            return ("model", section, key)
    return ("model", "config") if options else ("model", "path" if recipe.model.path else "name")


def _config_keys(config_class: type) -> set[str]:
    from transformers import PretrainedConfig

    keys: set[str] = set()
    for cls in config_class.__mro__:
        if cls is object:
            continue
        keys.update(p for p, v in inspect.signature(cls.__init__).parameters.items()
                    if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL) and p != "self")
        keys.update(k for k in vars(cls) if not k.startswith("_") and not callable(vars(cls)[k]))
        if cls is PretrainedConfig:
            break
    return keys | set(PretrainedConfig().to_dict())


def _unknown_config_keys(recipe: Recipe, model: nn.Module) -> list[str]:
    """Recipe ``model.config`` keys the model's config class does not know (transformers accepts them silently)."""
    from transformers import PretrainedConfig

    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig) or recipe.model.source == "timm":
        return []
    known = _config_keys(type(config))
    return [k for k in recipe.model.config if k != "model_type" and k not in known]


def _check_targets(recipe: Recipe, model: nn.Module, data: DataBundle | None = None) -> None:
    """Targets exist, each keeps at least one weight at the target density, and the method accepts them."""
    from .sparsifier import Sparsifier, example_batch

    spec = TargetSpec(**recipe.sparsity.targets.model_dump())
    targets = resolve_targets(model, spec)
    if not targets:
        key = "exclude" if "exclude" in recipe.sparsity.targets.model_fields_set else "include"
        raise recipe.error(("sparsity", "targets", key), f"selects no weight of {type(model).__name__} "
                                                         "(the output head stays dense unless included)")
    density = recipe.sparsity.target_density
    if density is not None:
        dead = [t for t in targets if round(density * t.numel()) == 0]
        if dead:
            smallest = min(t.numel() for t in targets)
            raise recipe.error(("sparsity", "target_density"),
                               f"{density!r} keeps no weight of {dead[0].name} ({dead[0].numel()} weights"
                               f"{f' and {len(dead) - 1} more layers' if len(dead) > 1 else ''}): the model "
                               f"would be dead; use at least {1 / smallest:.3g}")
    try:
        example = example_batch(data.train, data.collator) if data is not None and recipe.sparsity.budget else None
        Sparsifier(copy.deepcopy(model), recipe.sparsity, seed=0, example_inputs=example)
    except Exception as e:  # noqa: BLE001 - the method refusing this model is a recipe error
        if recipe.sparsity.budget is not None and "budget" in str(e):
            raise recipe.error(("sparsity", "budget"), str(e)) from None
        raise recipe.error(("sparsity", "method"), f"{recipe.sparsity.method} cannot sparsify this model: "
                                                   f"{type(e).__name__}: {e}") from None


def prepare_run(recipe: Recipe, output_dir: str | Path) -> PreparedRun:
    """Build data, model and arguments; raise RecipeError (located in the recipe) on any bad input."""
    for notice in recipe.notices():  # settings that run but do not do what they promise
        warnings.warn(notice, RecipeWarning, stacklevel=2)
    if recipe.export.format not in CHECKPOINT_FORMATS:
        raise recipe.error(("export", "format"), f"unknown checkpoint format {recipe.export.format!r}; choose one "
                                                 f"of {', '.join(CHECKPOINT_FORMATS)}")
    args = training_arguments(recipe, output_dir)
    data_field = "hub_id" if recipe.data.hub_id else "path" if recipe.data.path else "name"
    try:
        data = load_data(recipe.data)
    except DataError as e:
        raise recipe.error(("data", e.key or data_field), str(e)) from None
    except KeyError:
        from ..data import DATA_SOURCES

        raise recipe.error(("data", "name"), f"unknown data source {recipe.data.name!r}; "
                                             f"known: {', '.join(sorted(DATA_SOURCES))}") from None
    except Exception as e:  # noqa: BLE001 - unreadable data is bad input, never a traceback
        raise recipe.error(("data", data_field), f"cannot read the data: {type(e).__name__}: {e}") from None
    _check_training_values(recipe, args, len(data.train))
    try:
        set_seed(args.seed)  # model initialisation is part of the run: same recipe, same model
    except ValueError as e:
        raise recipe.error(("training", "seed"), str(e)) from None
    model = _build_model(recipe, data)
    if problem := forward_problem(model, data):  # e.g. images too small for the backbone's downsampling
        raise recipe.error(("data", "image_size"), problem)
    if recipe.sparsity.method != "none":
        spec = TargetSpec(**recipe.sparsity.targets.model_dump())
        for kind, pattern in unmatched_patterns(model, spec):
            index = getattr(spec, kind).index(pattern)
            raise recipe.error(("sparsity", "targets", kind, index),
                               f"pattern {pattern!r} matches no weight of the {'/'.join(spec.layer_types)} layers")
        if problem := target_problem(resolve_targets(model, spec), recipe.sparsity.granularity_spec()):
            raise recipe.error(("sparsity", "granularity"), problem)
        _check_targets(recipe, model, data)
        _check_method_can_act(recipe, model, args, len(data.train))
    teacher = _check_distillation(recipe, model, data) if recipe.distillation is not None else None
    return PreparedRun(recipe, data, model, args, teacher)


def _check_distillation(recipe: Recipe, model: nn.Module, data: DataBundle) -> nn.Module | None:
    """Load the teacher and run it beside the model on two examples; a RecipeError when either fails."""
    from .distill import TeacherError, check_distillation

    rows = [data.train[i] for i in range(min(2, len(data.train)))]
    try:
        return check_distillation(model, recipe.distillation, data.collator(rows))
    except TeacherError as e:
        raise recipe.error(("distillation", *e.key), str(e)) from None


def processing_class(data: DataBundle) -> Any:
    """What turns raw inputs into the model's: the speech processor or feature extractor, else the
    image collator's image processor (saved with checkpoints, for ``pipeline()``); None if unknown."""
    found = data.info.get("processor") or data.info.get("feature_extractor")
    make = getattr(data.collator, "image_processor", None)
    return found if found is not None or make is None else make()


def make_trainer(run: PreparedRun):
    from accelerate.utils import DistributedType

    from .trainer import SparseTrainer

    launched = launched_processes()
    if run.args.fsdp and launched <= 1:  # (a recipe may be validated in one process, not trained in one)
        raise run.recipe.error(("training", "fsdp"), "FSDP shards the model over several processes; start the run "
                                                     "with `accelerate launch --num_processes N -m hf_sparse train ...`")
    trainer = SparseTrainer(
        model=run.model, args=run.args, train_dataset=run.data.train, eval_dataset=run.data.eval,
        data_collator=run.data.collator, compute_metrics=run.data.compute_metrics,
        preprocess_logits_for_metrics=run.data.info.get("preprocess_logits_for_metrics"),
        processing_class=processing_class(run.data), recipe=run.recipe,
        teacher=run.teacher, callbacks=run.data.info.get("callbacks"))
    if launched > 1 and (trainer.accelerator.distributed_type == DistributedType.NO
                         or trainer.accelerator.num_processes != launched):
        raise run.recipe.error(("training",), f"{launched} processes were launched but the model would not be "
                                              "trained data-parallel (each rank alone, masks diverging); on CPU "
                                              "set training.use_cpu=true and training.ddp_backend=gloo")
    return trainer


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
        **report.results_fields(),
        "eval": {k.removeprefix("eval_"): v for k, v in metrics.items()},
        "train_runtime_s": runtime,
        "train_steps": train_output.global_step,
        "world_size": run.args.world_size,
        "hf_sparse_version": __version__,
    }
    if trainer.distiller is not None:
        results["distillation"] = trainer.distiller.describe()
    trainer.check_finite("at the end of training")
    if trainer.args.should_save:
        warn_empty_layers(report)
    model = trainer._model_to_save()  # every process: under FSDP2 the shards are gathered
    if trainer.args.should_save:
        write_folder_atomically(out / "model", lambda folder: trainer.save_sparse_model(
            folder, report=report, eval_metrics=results["eval"], dataset=run.data.card_name or None,
            task=run.data.task, model=model, measure_speed=True))  # the card states the speed
        export = run.recipe.export
        if export.push_to_hub:
            from ..checkpoint.hub import push_to_hub

            results["hub_commit"] = push_to_hub(out / "model", export.hub_model_id, private=export.private,
                                                revision=export.revision)
        write_file_atomically(out / RESULTS_FILE, json.dumps(results, indent=2))  # last: the run is finished
    trainer.accelerator.wait_for_everyone()
    return results


RESULTS_FILE = "results.json"


def warn_empty_layers(report: SparsityReport) -> list[str]:
    """Warn about targeted layers that ended with no nonzero weight (a dead model there); return them."""
    empty = [name for name, v in report.per_layer.items() if v.nonzero == 0]
    if empty:
        warnings.warn(f"{len(empty)} targeted layer(s) end with no nonzero weight ({', '.join(empty[:5])}): "
                      "their outputs no longer depend on the input; raise sparsity.target_density", stacklevel=2)
    return empty


def is_finished_run(run_dir: str | Path) -> bool:
    """A run directory whose run completed: ``results.json`` is written after everything else."""
    return (Path(run_dir) / RESULTS_FILE).is_file()


def write_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_folder_atomically(folder: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into ``<folder>.partial``, then swap it in: ``folder`` is whole or absent, never partial."""
    tmp, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    write(tmp)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def summary_table(results: dict[str, Any], sparsity=None, resumed_from: int | None = None) -> str:
    """The few lines ``hf-sparse train`` prints at the end of a run.

    Densities are shown in the unit the target was set in (``results["target_unit"]``): with L0's
    ``count: gates`` the kept fraction of gates (channels/units), and the kept fraction of weights
    beside it. ``sparsity`` is unused (kept for callers that pass it). ``resumed_from``: the step a resumed
    run started at, so the time is shown against the steps this process ran.
    """
    from ..checkpoint.model_card import density_words

    ev = results["eval"]
    metric = next((k for k in ("accuracy", "cer") if k in ev), "loss")
    target_row, achieved_row = density_words(results)
    rows = [("method", results["method"]), ("target density", target_row), ("achieved density", achieved_row),
            (metric, f"{ev.get(metric, float('nan')):.4f}"),
            ("train time", f"{results['train_runtime_s']:.1f} s ({results['train_steps']} steps)" if not resumed_from
             else f"{results['train_runtime_s']:.1f} s ({results['train_steps'] - resumed_from} steps in this "
                  f"process, resumed at step {resumed_from} of {results['train_steps']})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["PreparedRun", "RecipeError", "execute_run", "prepare_run", "summary_table"]
