"""SparseTrainer: ``transformers.Trainer`` plus a sparsity method, without copying its loop.

The method is driven through Trainer's own extension points:

* ``training_step`` (override): ``before_forward`` before the first micro-batch of an optimizer
  step, ``after_backward`` after the last one (when accelerate syncs gradients), so gradient
  clipping and the optimizer see the method's gradients;
* ``on_optimizer_step`` (callback): ``after_step`` right after ``optimizer.step()``;
* ``create_optimizer`` (override): the method's own trainable tensors (gates, auxiliary masks) join
  Trainer's optimizer as extra param groups, so their optimizer state is checkpointed with it;
* ``_save_checkpoint``/``_load_from_checkpoint`` (overrides): every checkpoint carries
  ``sparsity_state.pt`` and a resumed run continues exactly;
* ``log`` (override): density and the method's state go to every logging backend;
* ``compute_loss`` (override): with ``teacher=``/``distillation=`` (or a recipe's ``distillation:``),
  the task loss is combined with a frozen teacher's soft targets (``distill.py``);
* under Accelerate's FSDP2, ``create_scheduler`` and the optimizer save/load overrides build the
  method on the sharded model and keep its own tensors' optimizer state per rank (``fsdp2.py``).

With no sparsity configured it is exactly Trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config.recipe import DistillationConfig, Recipe, SparsityConfig, load_recipe
from . import fsdp2
from .distill import Distiller
from .report import SparsityReport
from .sparsifier import Sparsifier, targets_without_weight_decay

SPARSITY_STATE = "sparsity_state.pt"
#: Written into a checkpoint folder after everything else: a folder without it was cut short (a kill
#: mid-write) and is never resumed from.
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the run stops and nothing more is saved or pushed."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed from (another run's, damaged, planted files); the message says why."""


def _cannot_resume(folder: str | os.PathLike, e: BaseException) -> ResumeError:
    text = str(e).strip()
    reason = text.splitlines()[0] if text else type(e).__name__
    if not isinstance(e, (FileNotFoundError, ValueError)) or isinstance(e, json.JSONDecodeError):
        reason = f"{type(e).__name__}: {reason}"
    return ResumeError(f"cannot resume from {folder}: {reason}")


def check_resumable(folder: str | os.PathLike) -> None:
    """What can be checked before training starts: the completion marker and a readable trainer state."""
    folder = Path(folder)
    if not is_complete_checkpoint(folder):
        raise ResumeError(f"cannot resume from {folder}: it is incomplete (no {CHECKPOINT_COMPLETE}: the run was "
                          "stopped while writing it); resume from an earlier checkpoint")
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _cannot_resume(folder, e) from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ResumeError(f"cannot resume from {folder}: {state_file.name} holds no global_step")


def checkpoint_step(folder: Path) -> int | None:
    name = folder.name
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    return int(name[len(prefix):]) if name.startswith(prefix) and name[len(prefix):].isdigit() else None


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CHECKPOINT_COMPLETE).is_file()


def newest_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """(newest complete ``checkpoint-N`` folder of ``run_dir`` or None, newer incomplete ones it skipped)."""
    folders = [f for f in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f.is_dir() and checkpoint_step(f) is not None]
    skipped = []
    for folder in sorted(folders, key=checkpoint_step, reverse=True):
        if is_complete_checkpoint(folder):
            return folder, skipped
        skipped.append(folder)
    return None, skipped


def rotate_complete_checkpoints(run_dir: Path, limit: int | None, best: str | None = None) -> list[Path]:
    """Keep the newest ``limit`` complete checkpoints (and the best one); return the folders deleted.

    Runs only after the newest checkpoint is marked complete, so a kill at any moment leaves at least
    one complete checkpoint. Incomplete folders older than the newest complete one (left by an
    earlier kill) go too. A folder loses its marker before its files, so one deleted halfway is
    never taken for complete.
    """
    if not limit or limit <= 0:
        return []
    folders = sorted((f for f in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                      if f.is_dir() and checkpoint_step(f) is not None), key=checkpoint_step)
    complete = [f for f in folders if is_complete_checkpoint(f)]
    if not complete:
        return []
    keep = set(complete[-limit:]) | {complete[-1]}
    if best:
        keep |= {f for f in complete if f.resolve() == Path(best).resolve()}
    newest = checkpoint_step(complete[-1])
    doomed = [f for f in folders if f not in keep and (f in complete or checkpoint_step(f) < newest)]
    for folder in doomed:
        (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def _check_data_parallel(args) -> None:
    """Refuse a launch of several processes that would not train data-parallel.

    ``accelerate launch --num_processes 2 script.py`` on CPU starts two processes, but without
    ``use_cpu``/``gloo`` Trainer runs each alone (world size 1) on the same data, and their masks
    and weights diverge silently. (``hf-sparse train`` sets both itself.)
    """
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if launched > 1 and args.world_size != launched:
        raise ValueError(f"{launched} processes were launched, but this Trainer would train each alone (world size "
                         f"{args.world_size}) on the same data; on CPU pass TrainingArguments(use_cpu=True, "
                         "ddp_backend='gloo') (hf-sparse train does so itself)")


class _SparsityCallback(TrainerCallback):
    def __init__(self, trainer: SparseTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.sparsifier.setup(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        t.sparsifier.after_step(state.global_step, t.optimizer)
        t._forward_ready = False

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.sparsifier.finalize()


class SparseTrainer(Trainer):
    """``Trainer`` with sparsity: pass ``recipe=`` (a Recipe or a YAML path) or ``sparsity=``.

    ``sparsity`` is a :class:`~hf_sparse.recipe.SparsityConfig` or a dict of its fields, e.g.
    ``{"method": "gmp", "target_density": 0.1, "targets": {"exclude": ["classifier.*"]}}``.
    """

    def __init__(self, model=None, args=None, *trainer_args, recipe: Recipe | str | os.PathLike | None = None,
                 sparsity: SparsityConfig | dict | None = None,
                 teacher: torch.nn.Module | str | os.PathLike | None = None,
                 distillation: DistillationConfig | dict | None = None, **kwargs):
        super().__init__(model, args, *trainer_args, **kwargs)
        _check_data_parallel(self.args)
        if isinstance(recipe, (str, os.PathLike)):
            recipe = load_recipe(recipe)
        if sparsity is None and recipe is not None:
            sparsity = recipe.sparsity
        if isinstance(sparsity, dict):
            sparsity = SparsityConfig(**sparsity)
        self.recipe = recipe
        if distillation is None and recipe is not None:
            distillation = recipe.distillation
        if isinstance(distillation, dict):
            distillation = DistillationConfig(**distillation)
        if teacher is not None and distillation is None:
            distillation = DistillationConfig()
        self.distiller: Distiller | None = None
        if distillation is not None:  # before the method is built: teacher "self" is the starting weights
            self.distiller = Distiller(self.accelerator.unwrap_model(self.model), distillation, teacher=teacher)
            # every micro-batch's loss is a mean, divided by the accumulation steps like the task loss
            self.model_accepts_loss_kwargs, self.loss_is_scaled_for_ga = False, False
        if (self.args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true") and not self.is_fsdp_enabled:
            warnings.warn("FSDP was requested, but Accelerate enables it on accelerator devices only: this run "
                          f"is {self.accelerator.distributed_type.value} with a whole model on every process",
                          stacklevel=2)
        self.sparsifier: Sparsifier | None = None
        self._pending: tuple[SparsityConfig, Any] | None = None  # FSDP2: built once the model is sharded
        self._export_skeleton: fsdp2.ExportSkeleton | None = None
        self._own_optimizer_state: dict[str, Any] | None = None  # FSDP2: the method groups' state at resume
        if sparsity is not None and sparsity.method != "none":
            example = None
            if sparsity.budget is not None or sparsity.granularity_spec().structured:  # MACs at the training resolution
                from .sparsifier import example_batch

                example = example_batch(self.train_dataset, self.data_collator)
            if self.is_fsdp_enabled and not self._fsdp2:
                raise ValueError("sparsity under FSDP needs FSDP2 (fsdp_config: {fsdp_version: 2}): FSDP1 flattens "
                                 "the parameters, so the method's per-weight state would not line up with them")
            if self._fsdp2:
                # Targets are resolved on the sharded model, after Accelerate's fully_shard (see create_scheduler)
                self._pending = (sparsity, example)
                self._export_skeleton = fsdp2.ExportSkeleton(self.model) if self.args.should_save else None
            else:
                self.sparsifier = Sparsifier(self.model, sparsity, seed=self.args.seed, example_inputs=example)
            self.add_callback(_SparsityCallback(self))
        self._forward_ready = False

    @property
    def _fsdp2(self) -> bool:
        return self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2

    # -- the step ---------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        if self.sparsifier is None:
            return self._track_finite(super().training_step(model, inputs, *args, **kwargs))
        if not self._forward_ready:
            self.sparsifier.before_forward(self.state.global_step)
            self._forward_ready = True
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.sync_gradients:
            self.sparsifier.after_backward(self.state.global_step)
        return self._track_finite(loss)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Trainer's loss; while training with a teacher, combined with the distillation terms."""
        if self.distiller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.distiller.combine(loss, outputs, inputs, self.accelerator.unwrap_model(model))
        return (loss, outputs) if return_outputs else loss

    # -- divergence ---------------------------------------------------------------------------
    def _track_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Remember (on the device, no sync) whether every step's loss was finite.

        Trainer's ``logging_nan_inf_filter`` hides NaN losses from the logs, so they are watched here.
        """
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if getattr(self, "_losses_finite", None) is None else self._losses_finite & finite
        return loss

    def check_finite(self, when: str) -> None:
        """Raise TrainingDiverged if a loss since the start or any weight is NaN/inf."""
        flag = getattr(self, "_losses_finite", None)
        if flag is not None and not bool(flag):
            raise TrainingDiverged(f"training diverged: the loss became NaN or infinite by step {self.state.global_step} "
                                   f"({when}); lower training.learning_rate or set training.max_grad_norm")
        bad = next((n for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                    if not bool(torch.isfinite(p.detach()).all())), None)
        if bad is not None:
            raise TrainingDiverged(f"training diverged: {bad} holds NaN or infinite values at step "
                                   f"{self.state.global_step} ({when}); lower training.learning_rate or set "
                                   "training.max_grad_norm")

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.sparsifier is not None:
            for group in self.sparsifier.param_groups(self.args.learning_rate):
                optimizer.add_param_group(group)
        return optimizer

    def create_scheduler(self, *args, **kwargs):
        """Under FSDP2 Trainer creates the optimizer before ``accelerator.prepare`` shards the model,
        and Accelerate then swaps the optimizer's parameters for their shards by name, which the
        method's own tensors (gate logits) do not have. So the Sparsifier is built here, on the
        sharded model once prepare is done, and its param groups join the prepared optimizer before
        the scheduler is made (so they are scheduled) and before a checkpoint is loaded."""
        if self._pending is not None and fsdp2.model_has_dtensor(self.model):
            sparsity, example = self._pending
            self._pending = None
            self.sparsifier = Sparsifier(self.model, sparsity, seed=self.args.seed, example_inputs=example)
            for group in self.sparsifier.param_groups(self.args.learning_rate):
                self.optimizer.add_param_group(group)
        return super().create_scheduler(*args, **kwargs)

    def get_decay_parameter_names(self, model) -> list[str]:
        if self.sparsifier is not None:
            excluded = self.sparsifier.no_decay_parameter_names()
        elif self._pending is not None:  # FSDP2: the method is built after the optimizer
            excluded = targets_without_weight_decay(model, self._pending[0])
        else:
            excluded = set()
        return [n for n in super().get_decay_parameter_names(model) if n not in excluded]

    # -- logging ----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            self.check_finite("at a logging step")
        training_log = self.sparsifier is not None and "loss" in logs
        if training_log:
            logs = {**logs, **self.sparsifier.log_metrics()}
        if self.distiller is not None and "loss" in logs:
            logs = {**logs, **self.distiller.log_metrics()}
        super().log(logs, *args, **kwargs)
        if training_log:  # per-layer densities: to the report_to backends, not the console or log_history
            layers = self.sparsifier.log_metrics(per_layer=True)
            for callback in self.callback_handler.callbacks:
                if type(callback).__module__.startswith("transformers.integrations"):
                    callback.on_log(self.args, self.state, self.control, logs=layers)

    # -- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial, *args, **kwargs) -> None:
        """Trainer's checkpoint plus ``sparsity_state.pt``; ``CHECKPOINT_COMPLETE`` is written last.

        A kill while writing leaves a folder without the marker, which resuming skips.
        """
        self.check_finite("before writing a checkpoint")
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CHECKPOINT_COMPLETE).unlink(missing_ok=True)  # rewriting a folder: incomplete until done
        self.accelerator.wait_for_everyone()
        sharded = self.sparsifier is not None and self.sparsifier.shard is not None
        if self.sparsifier is not None and (self.args.should_save or sharded):  # FSDP2: one file per rank
            state = self.sparsifier.state_dict()
            if own := self._own_groups():
                state["optimizer"] = fsdp2.groups_state(self.optimizer, own)
            torch.save(state, folder / self.sparsifier.state_file(SPARSITY_STATE))
        if self.distiller is not None and self.args.should_save:  # the teacher's reference, never its weights
            self.distiller.write_reference(folder)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # Trainer would delete older checkpoints before this one is complete
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in
        if self.args.should_save and folder.is_dir():
            marker = folder / CHECKPOINT_COMPLETE
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"global_step": self.state.global_step}))
            os.replace(tmp, marker)
            rotate_complete_checkpoints(folder.parent, limit, self.state.best_model_checkpoint)

    def _run_epoch(self, *args, **kwargs):
        """Trainer's epoch, skipped once ``max_steps`` is reached.

        Resumed from a checkpoint written at the last step in mid-epoch, Trainer would otherwise run
        one more step (step max_steps + 1) before noticing that training is over.
        """
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer's ``train``; a checkpoint to resume from is checked first, and any failure to read
        it (another run's, damaged, a planted pickle) is one :class:`ResumeError`."""
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resumable(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args, **kwargs) -> None:
        try:
            self._load_sparse_checkpoint(resume_from_checkpoint, *args, **kwargs)
        except ResumeError:
            raise
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit this run is bad input
            raise _cannot_resume(resume_from_checkpoint, e) from None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)
        except Exception as e:  # noqa: BLE001
            raise _cannot_resume(checkpoint, e) from None

    def _load_sparse_checkpoint(self, resume_from_checkpoint: str, *args, **kwargs) -> None:
        if not is_complete_checkpoint(resume_from_checkpoint):
            raise FileNotFoundError(f"{resume_from_checkpoint} is incomplete (no {CHECKPOINT_COMPLETE}: the run was "
                                    "stopped while writing it); resume from an earlier checkpoint")
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        if self.sparsifier is not None:
            path = Path(resume_from_checkpoint) / self.sparsifier.state_file(SPARSITY_STATE)
            if not path.exists():
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {SPARSITY_STATE}: it was not written by a "
                                        f"SparseTrainer with sparsity, so the run cannot resume exactly")
            device = self.args.device  # under FSDP on CPU: cpu:0, which torch.load cannot map to
            state: dict[str, Any] = torch.load(path, map_location="cpu" if device.type == "cpu" else device,
                                               weights_only=True)
            self._own_optimizer_state = state.pop("optimizer", None)
            self.sparsifier.load_state_dict(state)
            self._forward_ready = False

    def _own_groups(self) -> list[dict[str, Any]]:
        """Under FSDP2, the optimizer's groups of the method's own tensors (see ``fsdp2``); else none."""
        if self.sparsifier is None or self.sparsifier.shard is None or self.optimizer is None:
            return []
        own = [p for g in self.sparsifier.param_groups(self.args.learning_rate) for p in g["params"]]
        return fsdp2.own_groups(self.optimizer, own) if own else []

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        with fsdp2.without_groups(self.optimizer, self._own_groups()):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        own = self._own_groups()
        with fsdp2.without_groups(self.optimizer, own):
            try:
                super()._load_optimizer_and_scheduler(checkpoint)
            except Exception as e:  # noqa: BLE001 - another run's optimizer state, or a planted pickle
                raise _cannot_resume(checkpoint, e) from None
        if own and checkpoint is not None:
            fsdp2.load_groups_state(self.optimizer, own, self._own_optimizer_state or {"groups": [], "state": []})

    # -- export -----------------------------------------------------------------------------
    def save_sparse_model(self, output_dir: str | os.PathLike, *, report: SparsityReport | dict | None = None,
                          eval_metrics: dict | None = None, format: str | None = None,
                          dataset: str | None = None, task: str | None = None,
                          model: torch.nn.Module | None = None, measure_speed: bool = False) -> Path:
        """Write the sparse checkpoint (weights, ``sparsity.json``, recipe, model card) to ``output_dir``;
        ``measure_speed`` times the sparse runtime against dense for the card (as ``hf-sparse train`` does).

        Training is over once this is called: the method's final hard masks are written first. Under
        FSDP2 call it on every process (the shards are gathered); the main process writes.
        """
        from ..checkpoint.save_and_load import save_sparse_checkpoint
        from .sparsifier import dense_report

        if report is None:
            if self.sparsifier is not None:
                self.sparsifier.finalize()
            trained = self.accelerator.unwrap_model(self.model)
            report = self.sparsifier.report(trained) if self.sparsifier else dense_report(trained)
        model = model if model is not None else self._model_to_save()
        if model is None or not self.args.should_save:  # FSDP2: the other processes only join the gather
            return Path(output_dir)
        report = report.to_dict() if isinstance(report, SparsityReport) else report
        export = self.recipe.export if self.recipe is not None else None
        return save_sparse_checkpoint(
            model, output_dir, report=report, recipe_yaml=self.recipe.to_yaml() if self.recipe else None,
            format=format or (export.format if export else "dense"), eval_metrics=eval_metrics,
            structure=report.get("structure"), processor=self.processing_class, dataset=dataset, task=task,
            measure_speed=measure_speed)

    def _model_to_save(self) -> torch.nn.Module | None:
        """The trained model with its final hard masks, whole: under FSDP2 the shards are gathered (a
        collective: every process calls this) into an unsharded copy on the main process, and the
        other processes get None."""
        if self.sparsifier is not None:
            self.sparsifier.finalize()
        self.check_finite("before saving the model")
        model = self.accelerator.unwrap_model(self.model)
        if not fsdp2.model_has_dtensor(model):
            return model
        return fsdp2.gather_model(model, self._export_skeleton)

    def push_to_hub(self, repo_id: str | None = None, *, private: bool = False, revision: str | None = None,
                    token: str | None = None, endpoint: str | None = None, format: str | None = None,
                    commit_message: str | None = None, **kwargs) -> str:
        """Save the sparse checkpoint under ``output_dir/model`` and push it as one Hub commit.

        ``repo_id`` defaults to ``args.hub_model_id``. Returns the commit URL; a failure raises
        ``hf_sparse.hub.HubError`` and leaves the local checkpoint untouched.
        """
        from ..checkpoint.hub import DEFAULT_COMMIT_MESSAGE
        from ..checkpoint.hub import push_to_hub as push_folder

        repo_id = repo_id or self.args.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub needs repo_id= or TrainingArguments.hub_model_id")
        folder = Path(self.args.output_dir) / "model"
        self.save_sparse_model(folder, format=format)  # every process: under FSDP2 the shards are gathered
        self.accelerator.wait_for_everyone()
        return push_folder(folder, repo_id, private=private, revision=revision, token=token or self.args.hub_token,
                           endpoint=endpoint, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
