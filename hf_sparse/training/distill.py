"""Knowledge distillation: a frozen teacher's soft targets join the student's task loss.

Hinton et al. (2015): ``loss = (1 - alpha) * task + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``,
with ``z_t``/``z_s`` the teacher's and the student's logits and ``T`` the temperature; the ``T^2``
keeps the soft term's gradients on the scale of the task term's as ``T`` changes. For logits with
a time axis (CTC: ``batch x frames x vocabulary``) the KL is taken per frame between the two
models' per-frame distributions and averaged over the valid frames only (padding is masked out,
from the model's ``output_lengths`` or the batch's ``attention_mask``). ``loss: mse`` replaces the KL
by the mean squared difference of the logits. Optional ``hidden: {student_module: teacher_module}``
pairs add ``hidden_weight * MSE`` between those modules' outputs (same-architecture pairs).

The teacher runs in eval mode without gradients, on the student's device and dtype. It is held by
the trainer, never by the model, so a checkpoint holds only its reference (``distillation.json``).
``teacher: self`` is a frozen copy of the model as it is handed to the trainer, before any pruning:
the weights the run starts from (a pretrained ``model.path`` or the seeded initialisation), which a
resumed run rebuilds identically. Under DDP and FSDP2 every process holds a whole (replicated) teacher.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config.recipe import DistillationConfig

#: Written into every Trainer checkpoint of a distilled run: the teacher's reference, never its weights.
DISTILLATION_FILE = "distillation.json"


class TeacherError(ValueError):
    """The teacher cannot be loaded or does not fit the student; ``key`` is the recipe key at fault."""

    def __init__(self, message: str, key: tuple[str | int, ...] = ("teacher",)):
        self.key = key
        super().__init__(message)


def teacher_folder(reference: str) -> str:
    """A finished run directory's ``model/`` folder; any other reference unchanged."""
    path = Path(reference).expanduser()
    if path.is_dir() and (path / "model").is_dir() and not (path / "config.json").is_file():
        return str(path / "model")
    return reference


def load_teacher(reference: str, student: nn.Module, revision: str | None = None) -> nn.Module:
    """Load ``reference`` (a checkpoint folder, a finished run directory or a Hub id) with ``load_sparse``.

    A timm checkpoint comes back as the plain timm model; it is wrapped like the student (keyword
    inputs) when the student is a wrapped timm model.
    """
    from ..checkpoint.save_and_load import CheckpointError, load_sparse
    from ..models.build import TimmClassifier

    try:
        teacher = load_sparse(teacher_folder(reference), revision=revision)
    except (CheckpointError, OSError, ValueError) as e:
        raise TeacherError(f"cannot load the teacher {reference!r}: {str(e).strip().splitlines()[0]}") from None
    if isinstance(student, TimmClassifier) and not isinstance(teacher, TimmClassifier):
        teacher = TimmClassifier(teacher, student.timm_name)
    return teacher


def logits_of(outputs: Any, with_loss: bool) -> torch.Tensor:
    """The logits of a model's output: ``.logits`` of a ModelOutput/dict, else the tensor or tuple item."""
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    if isinstance(outputs, torch.Tensor):
        return outputs
    return outputs[1 if with_loss else 0]


def _module(model: nn.Module, name: str, side: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise TeacherError(f"the {side} has no module {name!r}", ("hidden", name)) from None


def _first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor (GRU/LSTM return ``(output, state)``; ModelOutputs their first field)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
            if hasattr(item, "data") and isinstance(item.data, torch.Tensor):  # PackedSequence
                return item.data
    if hasattr(output, "data") and isinstance(output.data, torch.Tensor):
        return output.data
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


def frame_mask(outputs: Any, inputs: Mapping[str, Any], logits: torch.Tensor, model: nn.Module) -> torch.Tensor | None:
    """Which positions of ``batch x frames x ...`` logits are real: from ``output_lengths`` (hf_sparse's
    speech models), a transformers model's feature-extractor lengths, or an ``attention_mask`` of the
    logits' length; None when every frame counts."""
    frames = logits.shape[1]
    lengths = outputs.get("output_lengths") if isinstance(outputs, Mapping) else None
    mask = inputs.get("attention_mask")
    if lengths is None and mask is not None:
        if mask.shape[-1] == frames:
            return mask.bool()
        lengths_of = getattr(model, "_get_feat_extract_output_lengths", None)
        if callable(lengths_of):
            lengths = lengths_of(mask.sum(-1))
    if lengths is None:
        return None
    return torch.arange(frames, device=logits.device)[None, :] < lengths.to(logits.device)[:, None]


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "kl",
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per example (or per valid frame),
    averaged; ``kind="mse"``: the mean squared difference of the logits. Computed in float32."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)
    else:
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        per = (log_t.exp() * (log_t - log_s)).sum(-1) * temperature ** 2
    if mask is not None:
        per = per[mask]
    return per.mean()


class Distiller:
    """The frozen teacher and the combined loss. Built by ``SparseTrainer`` (``teacher=``, ``distillation=``)."""

    def __init__(self, student: nn.Module, config: DistillationConfig, teacher: nn.Module | str | None = None):
        self.config = config
        if teacher is None:
            teacher = config.teacher
        if teacher is student or (isinstance(teacher, str) and teacher == "self"):
            teacher, self.reference = copy.deepcopy(student), "self"  # the starting weights, frozen
        elif isinstance(teacher, nn.Module):
            self.reference = config.teacher if config.teacher != "self" else f"<{type(teacher).__name__} object>"
        else:
            self.reference = str(teacher)
            teacher = load_teacher(str(teacher), student, config.revision)
        self.teacher = teacher.eval().requires_grad_(False)
        self._placed: tuple[torch.device, torch.dtype] | None = None
        self._student_out: dict[str, torch.Tensor] = {}
        self._teacher_out: dict[str, torch.Tensor] = {}
        self._handles = []
        for s_name, t_name in config.hidden.items():
            self._handles.append(_module(student, s_name, "student").register_forward_hook(
                self._hook(self._student_out, s_name)))
            self._handles.append(_module(self.teacher, t_name, "teacher").register_forward_hook(
                self._hook(self._teacher_out, s_name)))
        self.last: dict[str, float | torch.Tensor] = {}

    @staticmethod
    def _hook(store: dict, key: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[key] = _first_tensor(output)  # replaced at every forward: at most one batch's output is held
        return hook

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def place(self, like: torch.Tensor | nn.Module) -> None:
        """Move the teacher to the student's device and floating dtype (once, or when they change)."""
        param = like if isinstance(like, torch.Tensor) else next(like.parameters(), None)
        if param is None:
            return
        where = (param.device, param.dtype if param.is_floating_point() else torch.float32)
        if where != self._placed:
            self.teacher.to(device=where[0], dtype=where[1])
            self._placed = where

    def teacher_outputs(self, inputs: Mapping[str, Any]) -> Any:
        """The teacher's forward on the student's inputs (labels removed), without gradients."""
        with torch.no_grad():
            return self.teacher(**{k: v for k, v in inputs.items() if k != "labels"})

    def combine(self, task_loss: torch.Tensor, outputs: Any, inputs: Mapping[str, Any],
                student: nn.Module) -> torch.Tensor:
        """``(1 - alpha) * task + alpha * soft-target term + hidden_weight * sum of hidden MSEs``."""
        cfg = self.config
        self.place(student)
        t_out = self.teacher_outputs(inputs)
        s_logits, t_logits = logits_of(outputs, with_loss=True), logits_of(t_out, with_loss=False)
        if s_logits.shape != t_logits.shape:
            raise TeacherError(f"the teacher's logits have shape {tuple(t_logits.shape)}, the student's "
                               f"{tuple(s_logits.shape)}: they must match")
        mask = frame_mask(outputs, inputs, s_logits, student) if s_logits.dim() >= 3 else None
        soft = soft_target_loss(s_logits, t_logits, cfg.temperature, cfg.loss, mask)
        loss = (1 - cfg.alpha) * task_loss + cfg.alpha * soft
        self.last = {"soft": soft.detach(), "task": task_loss.detach()}
        if cfg.hidden:
            hidden = task_loss.new_zeros((), dtype=torch.float32)
            for k in cfg.hidden:
                s_h, t_h = self._student_out.pop(k), self._teacher_out.pop(k)
                if s_h.shape != t_h.shape:
                    raise TeacherError(f"the student's {k!r} outputs shape {tuple(s_h.shape)}, the teacher's "
                                       f"{cfg.hidden[k]!r} {tuple(t_h.shape)}: they must match", ("hidden", k))
                hidden = hidden + F.mse_loss(s_h.float(), t_h.float())
            loss = loss + cfg.hidden_weight * hidden
            self.last["hidden"] = hidden.detach()
        return loss

    def log_metrics(self) -> dict[str, float]:
        """The last micro-batch's terms, for the training logs."""
        return {f"distillation/{k}": float(v) for k, v in self.last.items()}

    def describe(self) -> dict[str, Any]:
        """The run's distillation settings with the teacher's reference (what checkpoints and results hold)."""
        return {**self.config.model_dump(mode="json"), "teacher": self.reference}

    def write_reference(self, folder: str | Path) -> None:
        (Path(folder) / DISTILLATION_FILE).write_text(json.dumps(self.describe(), indent=2))


def check_distillation(student: nn.Module, config: DistillationConfig, batch: Mapping[str, Any],
                       teacher: nn.Module | None = None) -> nn.Module | None:
    """Load the teacher (None for ``self``) and run both models on one batch; raise TeacherError when
    the teacher cannot be loaded, a ``hidden`` module is missing, or the outputs do not match."""
    loaded = teacher
    if loaded is None and config.teacher != "self":
        loaded = load_teacher(config.teacher, student, config.revision)
    distiller = Distiller(student, config, teacher=loaded if loaded is not None else "self")
    was_training = student.training
    student.eval()  # no dropout draws, no BatchNorm statistics change: the run itself is unaffected
    try:
        distiller.place(student)
        with torch.no_grad():
            outputs = student(**batch)
            distiller.combine(logits_of(outputs, True).new_zeros(()), outputs, batch, student)
    except TeacherError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise TeacherError(f"the teacher fails on a batch of the data: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    finally:
        student.train(was_training)
        distiller.remove_hooks()
    return loaded

