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

import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .recipe import Recipe, SparsityConfig, load_recipe
from .sparsifier import Sparsifier

SPARSITY_STATE = "sparsity_state.pt"


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
            self.sparsifier = Sparsifier(self.model, sparsity, seed=self.args.seed)
            self.add_callback(_SparsityCallback(self))
        self._forward_ready = False

    # -- the step ---------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs) -> torch.Tensor:
        if self.sparsifier is None:
            return super().training_step(model, inputs, *args, **kwargs)
        if not self._forward_ready:
            self.sparsifier.before_forward(self.state.global_step)
            self._forward_ready = True
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.accelerator.sync_gradients:
            self.sparsifier.after_backward(self.state.global_step)
        return loss

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
        if self.sparsifier is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.sparsifier.state_dict(), folder / SPARSITY_STATE)
        super()._save_checkpoint(model, trial, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args, **kwargs) -> None:
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
    def save_sparse_model(self, output_dir: str | os.PathLike, *, report: dict | None = None,
                          eval_metrics: dict | None = None, format: str | None = None,
                          dataset: str | None = None, task: str | None = None) -> Path:
        """Write the sparse checkpoint (weights, ``sparsity.json``, recipe, model card) to ``output_dir``.

        Training is over once this is called: the method's final hard masks are written first.
        """
        from ..checkpoint.save_and_load import save_sparse_checkpoint
        from .sparsifier import dense_report

        if self.sparsifier is not None:
            self.sparsifier.finalize()
        model = self.accelerator.unwrap_model(self.model)
        if report is None:
            report = self.sparsifier.report(model) if self.sparsifier else dense_report(model)
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
