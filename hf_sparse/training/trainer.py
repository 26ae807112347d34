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
* ``log`` (override): density and the method's state go to every logging backend.

With no sparsity configured it is exactly Trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .recipe import Recipe, SparsityConfig, load_recipe
from .report import SparsityReport
from .sparsifier import Sparsifier

SPARSITY_STATE = "sparsity_state.pt"
#: Written into a checkpoint folder after everything else: a folder without it was cut short (a kill
#: mid-write) and is never resumed from.
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the run stops and nothing more is saved or pushed."""


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
                 sparsity: SparsityConfig | dict | None = None, **kwargs):
        super().__init__(model, args, *trainer_args, **kwargs)
        if isinstance(recipe, (str, os.PathLike)):
            recipe = load_recipe(recipe)
        if sparsity is None and recipe is not None:
            sparsity = recipe.sparsity
        if isinstance(sparsity, dict):
            sparsity = SparsityConfig(**sparsity)
        self.recipe = recipe
        self.sparsifier: Sparsifier | None = None
        if sparsity is not None and sparsity.method != "none":
            example = None
            if sparsity.budget is not None or sparsity.granularity_spec().structured:  # MACs at the training resolution
                from .sparsifier import example_batch

                example = example_batch(self.train_dataset, self.data_collator)
            self.sparsifier = Sparsifier(self.model, sparsity, seed=self.args.seed, example_inputs=example)
            self.add_callback(_SparsityCallback(self))
        self._forward_ready = False

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

    def get_decay_parameter_names(self, model) -> list[str]:
        names = super().get_decay_parameter_names(model)
        if self.sparsifier is not None:
            excluded = self.sparsifier.no_decay_parameter_names()
            names = [n for n in names if n not in excluded]
        return names

    # -- logging ----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            self.check_finite("at a logging step")
        training_log = self.sparsifier is not None and "loss" in logs
        if training_log:
            logs = {**logs, **self.sparsifier.log_metrics()}
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
            if self.sparsifier is not None:
                torch.save(self.sparsifier.state_dict(), folder / SPARSITY_STATE)
        super()._save_checkpoint(model, trial, *args, **kwargs)
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in
        if self.args.should_save and folder.is_dir():
            marker = folder / CHECKPOINT_COMPLETE
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"global_step": self.state.global_step}))
            os.replace(tmp, marker)

    def _run_epoch(self, *args, **kwargs):
        """Trainer's epoch, skipped once ``max_steps`` is reached.

        Resumed from a checkpoint written at the last step in mid-epoch, Trainer would otherwise run
        one more step (step max_steps + 1) before noticing that training is over.
        """
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args, **kwargs) -> None:
        if not is_complete_checkpoint(resume_from_checkpoint):
            raise FileNotFoundError(f"{resume_from_checkpoint} is incomplete (no {CHECKPOINT_COMPLETE}: the run was "
                                    "stopped while writing it); resume from an earlier checkpoint")
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        if self.sparsifier is not None:
            path = Path(resume_from_checkpoint) / SPARSITY_STATE
            if not path.exists():
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {SPARSITY_STATE}: it was not written by a "
                                        f"SparseTrainer with sparsity, so the run cannot resume exactly")
            state: dict[str, Any] = torch.load(path, map_location=self.args.device, weights_only=True)
            self.sparsifier.load_state_dict(state)
            self._forward_ready = False

    # -- export -----------------------------------------------------------------------------
    def save_sparse_model(self, output_dir: str | os.PathLike, *, report: SparsityReport | dict | None = None,
                          eval_metrics: dict | None = None, format: str | None = None,
                          dataset: str | None = None, task: str | None = None) -> Path:
        """Write the sparse checkpoint (weights, ``sparsity.json``, recipe, model card) to ``output_dir``.

        Training is over once this is called: the method's final hard masks are written first.
        """
        from ..checkpoint.save_and_load import save_sparse_checkpoint
        from .sparsifier import dense_report

        if self.sparsifier is not None:
            self.sparsifier.finalize()
        self.check_finite("before saving the model")
        model = self.accelerator.unwrap_model(self.model)
        if report is None:
            report = self.sparsifier.report(model) if self.sparsifier else dense_report(model)
        report = report.to_dict() if isinstance(report, SparsityReport) else report
        export = self.recipe.export if self.recipe is not None else None
        return save_sparse_checkpoint(
            model, output_dir, report=report, recipe_yaml=self.recipe.to_yaml() if self.recipe else None,
            format=format or (export.format if export else "dense"), eval_metrics=eval_metrics,
            structure=report.get("structure"), processor=self.processing_class, dataset=dataset, task=task)

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
        if self.args.should_save:
            self.save_sparse_model(folder, format=format)
        self.accelerator.wait_for_everyone()
        return push_folder(folder, repo_id, private=private, revision=revision, token=token or self.args.hub_token,
                           endpoint=endpoint, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE)
